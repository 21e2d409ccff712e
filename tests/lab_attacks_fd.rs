//! Issue 23 part 3: a pod that opens ~20,000 idle connections to its node's agent ports must not
//! stop NetworkPolicy enforcement, pod admission or the agent's readiness. Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NODE_IP: &str = "172.30.0.11";
/// Per holder process; two per port, so that the attack outgrows the agent's 20,000 descriptors.
const CONNECTIONS: usize = 12_000;

/// The attacker's holder process, killed (and reaped) when dropped.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from `ip:port` inside the node's namespace; None when nothing answered within 3 s.
fn http_status(lab: &Lab, ip: &str, port: u16, path: &str) -> Option<u16> {
    let (ip, path) = (ip.to_string(), path.to_string());
    veilnet::netns::run_in(&lab.node_netns(1), move || {
        let addr = format!("{ip}:{port}").parse().ok()?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        raw.split_whitespace().nth(1)?.parse().ok()
    })
    .ok()
    .flatten()
}

/// The agent's readiness, wherever this build serves it (loopback, else the node address).
fn ready(lab: &Lab) -> Option<u16> {
    http_status(lab, "127.0.0.1", 9891, "/readyz")
        .or_else(|| http_status(lab, NODE_IP, 9891, "/readyz"))
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn pod_running_ip(lab: &Lab, name: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let out = lab.kubectl(&["get", "pod", "-n", "default", name, "-o", "json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if let (Some(ip), Some("Running")) =
                (v["status"]["podIP"].as_str(), v["status"]["phase"].as_str())
            {
                return Some(ip.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn a_pod_holding_thousands_of_connections_cannot_stop_policy_or_admission() {
    veilnet_test_support::require_root!();
    let started = Instant::now();
    let lab = Lab::up("fd", &["--nodes", "1"]);
    lab.apply(&pod_manifest(
        "default",
        "a",
        "node-1",
        &[("app", "a")],
        SERVE,
    ));
    lab.apply(&pod_manifest("default", "b", "node-1", &[], SERVE));
    lab.apply(&pod_manifest("default", "attacker", "node-1", &[], SERVE));
    let a_ip = lab.wait_pod_ip("default/a", Duration::from_secs(60));
    let b_ip = lab.wait_pod_ip("default/b", Duration::from_secs(60));
    lab.wait_pod_ip("default/attacker", Duration::from_secs(60));
    let b_ns = lab.pod_netns("default/b");
    let target = format!("{a_ip}:80");
    assert_eq!(
        probe_in(&b_ns, &target, "tcp", "2s"),
        Some(0),
        "b reaches a before the attack"
    );
    let agent = lab.daemon_pid("agent-node-1").expect("agent-node-1 runs");
    let fds_before = open_fds(agent);

    // The attack: every agent port the pod can reach on its node's address, one holder process
    // per port (a process may hold at most its own RLIMIT_NOFILE, 20,000 here).
    let attacker_ns = lab.pod_netns("default/attacker");
    let mut holders = Vec::new();
    let mut summaries = Vec::new();
    for port in [9891, 9891, 9892, 9892] {
        let mut cmd = veilnet();
        cmd.args(["lab", "agnhost", "hold", &format!("{NODE_IP}:{port}")])
            .args(["--count", &CONNECTIONS.to_string(), "--duration", "180s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        veilnet::netns::command_in(&attacker_ns, &mut cmd).unwrap();
        let mut holder = Holder(cmd.spawn().expect("spawn the holder"));
        let stdout = holder.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        holders.push(holder);
        let summary = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the holder opened its connections within 120 s");
        summaries.push(format!("port {port}: {}", summary.trim()));
    }
    let fds_during = open_fds(agent);
    eprintln!("holders: {summaries:?}; agent fds: {fds_before} before, {fds_during} during");

    // A new deny policy while the connections are held.
    lab.apply(
        r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-a", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"]}}"#,
    );
    let applied = Instant::now();
    let mut enforced_after = None;
    while applied.elapsed() < Duration::from_secs(15) {
        if probe_in(&b_ns, &target, "tcp", "1s") != Some(0) {
            enforced_after = Some(applied.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // A new pod on the same node.
    lab.apply(&pod_manifest("default", "c", "node-1", &[], SERVE));
    let c_ip = pod_running_ip(&lab, "c", Duration::from_secs(30));
    let c_networked = c_ip.is_some()
        && probe_in(
            &lab.pod_netns("default/c"),
            &format!("{b_ip}:80"),
            "tcp",
            "2s",
        ) == Some(0);
    let readyz = ready(&lab);
    // Prometheus (here: pod b) still scrapes the node's metrics.
    let scraped = veilnet::netns::run_in(&b_ns, || {
        let addr = format!("{NODE_IP}:9892").parse().unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        Some(raw)
    })
    .ok()
    .flatten()
    .unwrap_or_default();
    let scrape_ok =
        scraped.starts_with("HTTP/1.1 200") && scraped.contains("veilnet_connections_open");
    let fds_after = open_fds(agent);
    let log = std::fs::read_to_string(format!(
        "/var/lib/veilnet-lab/{}/logs/agent-node-1.log",
        lab.name
    ))
    .unwrap_or_default();
    let emfile = log.matches("Too many open files").count();
    eprintln!(
        "policy enforced after {enforced_after:?}; pod c ip {c_ip:?}, networked {c_networked}; \
         /readyz {readyz:?}; metrics scraped from pod b: {scrape_ok}; agent fds {fds_after}; 'Too many open files' in the agent log: {emfile}; \
         test ran {:?}",
        started.elapsed()
    );
    drop(holders);

    assert!(
        enforced_after.is_some_and(|d| d <= Duration::from_secs(5)),
        "the deny policy was not enforced within 5 s (after {enforced_after:?})\n{}",
        lab.logs()
    );
    assert!(
        c_networked,
        "pod c did not start networked ({c_ip:?})\n{}",
        lab.logs()
    );
    assert_eq!(
        readyz,
        Some(200),
        "the agent is not Ready during the attack"
    );
    assert!(
        scrape_ok,
        "pod b cannot scrape the metrics:\n{}",
        scraped.chars().take(2_000).collect::<String>()
    );
    assert!(
        fds_during < 2_000,
        "the agent held {fds_during} descriptors during the attack"
    );
    assert_eq!(
        emfile,
        0,
        "the agent ran out of descriptors:\n{}",
        lab.logs()
    );
    assert_eq!(
        lab.daemon_pid("agent-node-1"),
        Some(agent),
        "the agent restarted"
    );
}
