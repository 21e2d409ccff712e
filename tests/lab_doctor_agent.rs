//! `veilnet doctor`'s agent-side checks on a live lab node: all OK on a healthy 2-node lab, then
//! one thing broken at a time (the key's mode, a stopped datapath, a deleted and an edited
//! nftables table, a small MTU on the underlay) and restored. Needs root. Stale handshakes and
//! clock skew cannot be produced quickly in a lab (one kernel clock, 3-minute timers): their
//! checks are unit-tested only.
//!
//! Control planes: both (the checks read the node, not the API, except clock.skew, which asks
//! either control plane's API server for its Date).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Runs `veilnet doctor --lab … --node node-1 --json`: check name → (verdict, evidence).
fn doctor(lab: &Lab) -> Vec<(String, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_veilnet"))
        .args(["doctor", "--lab", &lab.name, "--node", "node-1", "--json"])
        .output()
        .expect("spawn veilnet doctor");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}\n{}", text(&out)));
    reports[0]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["verdict"].as_str().unwrap_or("").to_string(),
                c["evidence"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn verdict_of(checks: &[(String, String, String)], name: &str) -> Option<(String, String)> {
    checks
        .iter()
        .find(|c| c.0 == name)
        .map(|c| (c.1.clone(), c.2.clone()))
}

/// Waits until `name` has `verdict`; returns its evidence.
fn wait_verdict(lab: &Lab, name: &str, verdict: &str, within: Duration) -> String {
    let mut last = None;
    let deadline = std::time::Instant::now() + within;
    loop {
        let checks = doctor(lab);
        last = verdict_of(&checks, name).or(last);
        if let Some((v, e)) = &last {
            if v == verdict {
                return e.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never became {verdict}; last {last:?}; all: {checks:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Sends SIGCONT to its pids when dropped, so a failing test never leaves a stopped daemon
/// behind (the lab's teardown could not stop it).
struct Continue(Vec<i32>);

impl Drop for Continue {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGCONT);
        }
    }
}

fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

const OURS: [&str; 13] = [
    "agent.up",
    "agent.health",
    "agent.rejected",
    "agent.handshakes",
    "agent.plaintext",
    "datapath.up",
    "datapath.packet-thread",
    "datapath.version",
    "keys.file",
    "keys.published",
    "nftables.inet.veilnet_wire",
    "mtu.route",
    "mtu.probe",
];

#[test]
fn doctor_finds_each_broken_thing_and_clears_when_restored() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("doc", &["--nodes", "2"]);
    // Traffic between the nodes' pods, so the WireGuard pair has a session to report.
    lab.apply(&pod_manifest("default", "a", "node-1", &[], SERVE));
    lab.apply(&pod_manifest("default", "b", "node-2", &[], SERVE));
    let ip_b = lab.wait_pod_ip("default/b", Duration::from_secs(60));
    lab.wait_pod_ip("default/a", Duration::from_secs(60));
    eventually(Duration::from_secs(30), "a reaches b", || {
        lab.connect("default/a", &format!("{ip_b}:80"), "tcp", "2s") == Some(0)
    });

    // Healthy: every one of these checks OK (the policy tables too, when the agent enforces).
    let mut healthy = Vec::new();
    eventually(Duration::from_secs(30), "every check OK", || {
        healthy = doctor(&lab);
        OURS.iter()
            .all(|n| verdict_of(&healthy, n).is_some_and(|(v, _)| v == "OK"))
            && healthy
                .iter()
                .filter(|c| c.0.starts_with("nftables."))
                .all(|c| c.1 == "OK")
    });
    assert!(
        verdict_of(&healthy, "clock.skew").is_some_and(|(v, _)| v == "OK"),
        "{healthy:#?}"
    );

    let status = node_status(&lab, "node-1");
    let agent_pid = lab.daemon_pid("agent-node-1").expect("agent pid");
    let datapath_pid = status["datapath"]["pid"].as_i64().expect("datapath pid") as i32;
    let _cont = Continue(vec![agent_pid, datapath_pid]);

    // (a) The key readable by others.
    use std::os::unix::fs::PermissionsExt;
    let paths = veilnet::lab_paths::LabPaths::new(&lab.name).unwrap();
    let key = veilnet::agent::wireguard::key_path(&paths.node_state_dir("node-1"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let evidence = wait_verdict(&lab, "keys.file", "FAIL", Duration::from_secs(5));
    assert!(evidence.contains("0644"), "{evidence}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    wait_verdict(&lab, "keys.file", "OK", Duration::from_secs(5));

    // (b) The datapath stopped: its socket does not answer.
    signal(datapath_pid, Signal::SIGSTOP);
    let evidence = wait_verdict(&lab, "datapath.up", "FAIL", Duration::from_secs(10));
    assert!(evidence.contains("does not answer"), "{evidence}");
    signal(datapath_pid, Signal::SIGCONT);
    wait_verdict(
        &lab,
        "datapath.packet-thread",
        "OK",
        Duration::from_secs(10),
    );

    // (c) The agent stopped and its wire table deleted: missing; restored once it runs again.
    signal(agent_pid, Signal::SIGSTOP);
    let ns = lab.node_netns(1);
    ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns,
        "nft",
        "delete",
        "table",
        "inet",
        "veilnet_wire",
    ]));
    let evidence = wait_verdict(
        &lab,
        "nftables.inet.veilnet_wire",
        "FAIL",
        Duration::from_secs(5),
    );
    assert!(
        evidence.contains("inet veilnet_wire is missing"),
        "{evidence}"
    );
    signal(agent_pid, Signal::SIGCONT);
    wait_verdict(
        &lab,
        "nftables.inet.veilnet_wire",
        "OK",
        Duration::from_secs(20),
    );

    // (c2) The policy tables deleted while the agent runs: it loads them again within its
    // 5 s housekeeping (before, enforcement stayed off until the agent restarted).
    for family in ["inet", "bridge"] {
        ok(Command::new("ip").args([
            "netns", "exec", &ns, "nft", "delete", "table", family, "veilnet",
        ]));
    }
    for family in ["inet", "bridge"] {
        wait_verdict(
            &lab,
            &format!("nftables.{family}.veilnet"),
            "OK",
            Duration::from_secs(20),
        );
    }
    let log = lab.agent_log("node-1");
    assert!(
        log.contains("the policy table is gone from the kernel; loading it again"),
        "{log}"
    );

    // (d) Drift: a rule someone added to one of veilnet's chains.
    ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns,
        "nft",
        "insert",
        "rule",
        "inet",
        "veilnet_wire",
        "input",
        "ip",
        "saddr",
        "192.0.2.77",
        "drop",
    ]));
    let evidence = wait_verdict(
        &lab,
        "nftables.inet.veilnet_wire",
        "FAIL",
        Duration::from_secs(5),
    );
    assert!(evidence.contains("192.0.2.77"), "{evidence}");
    let listing = ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns,
        "nft",
        "-a",
        "list",
        "chain",
        "inet",
        "veilnet_wire",
        "input",
    ]));
    let handle = listing
        .lines()
        .find(|l| l.contains("192.0.2.77"))
        .and_then(|l| l.rsplit(' ').next())
        .expect("the added rule's handle")
        .to_string();
    ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns,
        "nft",
        "delete",
        "rule",
        "inet",
        "veilnet_wire",
        "input",
        "handle",
        &handle,
    ]));
    wait_verdict(
        &lab,
        "nftables.inet.veilnet_wire",
        "OK",
        Duration::from_secs(5),
    );

    // (e) node-2's port on the underlay switch with a small MTU: big DF packets are dropped.
    let ul = lab.underlay_netns();
    let before = ok(Command::new("ip").args(["-n", &ul, "-j", "link", "show", "dev", "n2"]));
    let mtu: serde_json::Value = serde_json::from_str(&before).unwrap();
    let mtu = mtu[0]["mtu"].as_u64().expect("n2's mtu").to_string();
    ok(Command::new("ip").args(["-n", &ul, "link", "set", "dev", "n2", "mtu", "1280"]));
    let result = std::panic::catch_unwind(|| {
        wait_verdict(&lab, "mtu.probe", "FAIL", Duration::from_secs(20))
    });
    ok(Command::new("ip").args(["-n", &ul, "link", "set", "dev", "n2", "mtu", &mtu]));
    let evidence = result.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(evidence.contains("node-2"), "{evidence}");
    assert!(evidence.contains("84 bytes answered"), "{evidence}");
    wait_verdict(&lab, "mtu.probe", "OK", Duration::from_secs(20));
}
