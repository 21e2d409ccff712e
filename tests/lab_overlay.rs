//! The plaintext overlay in the lab (`--encryption off` where the VXLAN path itself is checked;
//! encryption has its own tests in lab_encryption.rs), as a user checks it: pods on every node reach each other, the
//! agent allocates distinct CIDRs, survives restarts without touching the dataplane, forgets deleted
//! nodes, ignores malformed peers, and sizes the MTU right. Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// Runs `jobs` on a few threads (each job spawns processes; keep the 2-core machine responsive).
fn parallel<T: Send>(jobs: Vec<T>, threads: usize, f: impl Fn(&T) + Sync) {
    let queue = Mutex::new(jobs);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some(job) = queue.lock().unwrap().pop() else {
                    break;
                };
                f(&job);
            });
        }
    });
}

#[test]
fn every_pod_reaches_every_other_pod_across_three_nodes() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("ov", &["--nodes", "3", "--encryption", "off"]);
    let mut pods = Vec::new();
    for node in 1..=3 {
        for i in 1..=2 {
            let name = format!("p{node}{i}");
            lab.apply(&pod_manifest(
                "default",
                &name,
                &format!("node-{node}"),
                &[("app", "x")],
                SERVE,
            ));
            pods.push(name);
        }
    }
    let ips: Vec<(String, String)> = pods
        .iter()
        .map(|p| {
            (
                p.clone(),
                lab.wait_pod_ip(&format!("default/{p}"), Duration::from_secs(60)),
            )
        })
        .collect();
    // Each node's pods are in that node's CIDR, and all IPs are distinct.
    assert_eq!(
        ips.iter().map(|(_, ip)| ip).collect::<BTreeSet<_>>().len(),
        6
    );

    let mut jobs = Vec::new();
    for (src, _) in &ips {
        for (dst, ip) in &ips {
            if src != dst {
                jobs.push((src.clone(), dst.clone(), ip.clone()));
            }
        }
    }
    let failures = Mutex::new(Vec::new());
    parallel(jobs, 6, |(src, dst, ip)| {
        let pod = format!("default/{src}");
        for (proto, port) in [("tcp", "80"), ("udp", "81")] {
            let code = lab.connect(&pod, &format!("{ip}:{port}"), proto, "3s");
            if code != Some(0) {
                failures
                    .lock()
                    .unwrap()
                    .push(format!("{src} -> {dst} {proto}/{port}: exit {code:?}"));
            }
        }
        let ping = lab.exec(&pod, &["ping", "-c1", "-W2", ip]);
        if !ping.status.success() {
            failures
                .lock()
                .unwrap()
                .push(format!("{src} -> {dst} ping"));
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} probes failed:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        lab.logs()
    );
}

#[test]
fn agents_allocate_distinct_cidrs_when_nodes_have_none() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("alloc", &["--nodes", "5", "--pod-cidrs", "agent"]);
    let mut cidrs = BTreeSet::new();
    eventually(
        Duration::from_secs(30),
        "5 nodes publish a pod CIDR",
        || {
            let nodes = lab.kubectl_json(&["get", "nodes"]);
            cidrs = nodes["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|n| {
                    n["metadata"]["annotations"]["veilnet.io/pod-cidrs"]
                        .as_str()
                        .map(String::from)
                })
                .collect();
            cidrs.len() == 5
        },
    );
    for n in &nodes_without_spec(&lab) {
        assert!(
            n.is_empty(),
            "the lab must leave spec.podCIDR empty in agent mode: {n}"
        );
    }
    // The shared record agrees, one entry per node.
    let record = lab.kubectl_json(&[
        "get",
        "configmap",
        "-n",
        "veilnet-system",
        "veilnet-pod-cidrs",
    ]);
    let data = record["data"].as_object().unwrap();
    assert_eq!(data.len(), 5, "{record:#}");
    let recorded: BTreeSet<String> = data
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(recorded, cidrs);

    // And traffic flows with them.
    lab.apply(&pod_manifest("default", "a", "node-1", &[], SERVE));
    lab.apply(&pod_manifest("default", "b", "node-5", &[], SERVE));
    let ip = lab.wait_pod_ip("default/a", Duration::from_secs(60));
    lab.wait_pod_ip("default/b", Duration::from_secs(60));
    assert_eq!(
        lab.connect("default/b", &format!("{ip}:80"), "tcp", "3s"),
        Some(0),
        "{}",
        lab.logs()
    );
}

fn nodes_without_spec(lab: &Lab) -> Vec<String> {
    lab.kubectl_json(&["get", "nodes"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["spec"]["podCIDR"].as_str().unwrap_or("").to_string())
        .collect()
}

/// ifindex and name of veilnet's links in a node.
fn veilnet_links(lab: &Lab, node: usize) -> Vec<String> {
    lab.ip(node, &["-o", "link", "show"])
        .lines()
        .filter(|l| {
            let name = l.split(':').nth(1).unwrap_or("").trim();
            name == "veilbr0" || name.starts_with("veilvx") || name == "veilwg0"
        })
        .map(|l| l.split(':').take(2).collect::<Vec<_>>().join(":"))
        .collect()
}

#[test]
fn agent_restart_keeps_links_and_flows() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("rs", &["--nodes", "2"]);
    let ip = iperf_server_and_client(&lab);
    let links_before = (veilnet_links(&lab, 1), veilnet_links(&lab, 2));
    assert_eq!(links_before.0.len(), 3, "{links_before:?}");

    let stream = reverse_stream(&lab, &ip, 8);
    std::thread::sleep(Duration::from_secs(2));
    let datapaths = (
        lab.daemon_pid("datapath-node-1"),
        lab.daemon_pid("datapath-node-2"),
    );
    lab.kill_daemon("agent-node-1");
    lab.kill_daemon("agent-node-2");
    // Both agents stay away for 3 s, as in a rollout whose new pod takes seconds to start: the
    // datapath processes keep the encrypted stream moving meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    // `lab up` again restarts what is not running (and only that).
    lab.up_again();
    assert!(lab.daemon_pid("agent-node-1").is_some());
    assert_eq!(
        (
            lab.daemon_pid("datapath-node-1"),
            lab.daemon_pid("datapath-node-2")
        ),
        datapaths,
        "the datapaths must not restart with the agents"
    );
    let report = stream_report(&lab, stream, "the agent restart");
    // The longest stretch of intervals in which nothing arrived: the stall the restart caused.
    let (longest, intervals) = longest_stall(&report);
    assert!(intervals >= 30, "too few intervals: {intervals}");
    eprintln!("longest stall across the agent restart (agents down 3 s): {longest:.2} s");
    assert!(
        longest <= 1.0,
        "the stream stalled {longest:.2} s across the agent restart (at most 1 s)"
    );
    assert_eq!(
        (veilnet_links(&lab, 1), veilnet_links(&lab, 2)),
        links_before,
        "a link was recreated"
    );
}

/// An iperf3 server pod on node-1 and a client pod on node-2; returns the server's IP.
fn iperf_server_and_client(lab: &Lab) -> String {
    lab.apply(&pod_manifest(
        "default",
        "server",
        "node-1",
        &[],
        &["iperf3", "-s", "-p", "5201"],
    ));
    lab.apply(&pod_manifest("default", "client", "node-2", &[], SERVE));
    let ip = lab.wait_pod_ip("default/server", Duration::from_secs(60));
    lab.wait_pod_ip("default/client", Duration::from_secs(60));
    ip
}

/// A TCP stream of `seconds` from the server on node-1 to the client on node-2 (reverse mode:
/// the client receives and reports what arrived every 0.2 s), bandwidth-limited to keep the
/// machine calm.
fn reverse_stream(lab: &Lab, ip: &str, seconds: u32) -> std::process::Child {
    let seconds = seconds.to_string();
    lab_exec_spawn(
        lab,
        "default/client",
        &[
            "iperf3", "-c", ip, "-t", &seconds, "-b", "50M", "-R", "-i", "0.2", "--json",
        ],
    )
}

/// Waits for the stream and returns its JSON report; the stream must not have broken `across`.
fn stream_report(lab: &Lab, stream: std::process::Child, across: &str) -> serde_json::Value {
    let out = stream.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the stream broke across {across}:\n{}\n{}",
        text(&out),
        lab.logs()
    );
    serde_json::from_slice(&out.stdout).expect("iperf3 json")
}

/// The longest run of iperf3 intervals (JSON report) in which nothing arrived, in seconds.
fn longest_stall(report: &serde_json::Value) -> (f64, usize) {
    let intervals = report["intervals"].as_array().expect("intervals");
    let (mut stall, mut longest) = (0.0f64, 0.0f64);
    for i in intervals {
        let sum = &i["sum"];
        if sum["bytes"].as_f64().unwrap_or(0.0) == 0.0 {
            stall += sum["seconds"].as_f64().unwrap_or(0.0);
            longest = longest.max(stall);
        } else {
            stall = 0.0;
        }
    }
    (longest, intervals.len())
}

#[test]
fn a_restarted_datapath_resumes_from_its_saved_state_or_from_the_agent() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("dpr", &["--nodes", "2"]);
    let ip = iperf_server_and_client(&lab);

    // 1. The datapath crashes mid-stream and comes back: it restores its device and peers from
    // its saved state (the agent is not involved) and the TCP stream survives.
    let stream = reverse_stream(&lab, &ip, 6);
    std::thread::sleep(Duration::from_secs(2));
    lab.kill_daemon("datapath-node-1");
    lab.up_again();
    let report = stream_report(&lab, stream, "the datapath restart");
    let (longest, _) = longest_stall(&report);
    eprintln!("longest stall across the datapath restart: {longest:.2} s");
    assert!(
        longest <= 3.0,
        "the stream stalled {longest:.2} s across the datapath restart"
    );
    let log = |role: &str| {
        std::fs::read_to_string(format!("/var/lib/veilnet-lab/{}/logs/{role}.log", lab.name))
            .unwrap_or_default()
    };
    assert!(
        log("datapath-node-1").contains("restored the saved device and peers"),
        "{}",
        lab.logs()
    );

    // 2. The datapath comes back without its state (say, a wiped /run): the agent notices on its
    // next status refresh and configures it again.
    lab.kill_daemon("datapath-node-1");
    let state = format!(
        "/var/lib/veilnet-lab/{}/nodes/node-1/run/{}",
        lab.name,
        veilnet::datapath::STATE_FILE
    );
    std::fs::remove_file(&state).unwrap();
    lab.up_again();
    eventually(
        Duration::from_secs(10),
        "traffic through the repaired datapath",
        || {
            lab.exec(
                "default/client",
                &["iperf3", "-c", &ip, "-t", "1", "-b", "10M"],
            )
            .status
            .success()
        },
    );
    assert!(
        log("agent-node-1").contains("the datapath restarted"),
        "{}",
        lab.logs()
    );
    assert!(
        std::path::Path::new(&state).exists(),
        "the agent's configuration is saved again"
    );
}

fn lab_exec_spawn(lab: &Lab, pod: &str, cmd: &[&str]) -> std::process::Child {
    veilnet()
        .args(["lab", "exec", "--name", &lab.name, pod, "--"])
        .args(cmd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_deleted_node_disappears_from_its_peers() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("del", &["--nodes", "3", "--encryption", "off"]);
    let routes_to_n3 = |lab: &Lab| lab.ip(1, &["route", "show", "10.244.3.0/24"]);
    let fdb_to_n3 =
        |lab: &Lab| {
            ok(Command::new("bridge").args([
                "-n",
                &lab.node_netns(1),
                "fdb",
                "show",
                "dev",
                "veilvx1",
            ]))
            .lines()
            .filter(|l| l.contains("172.30.0.13"))
            .count()
        };
    eventually(Duration::from_secs(20), "node-1 routes to node-3", || {
        !routes_to_n3(&lab).is_empty()
    });
    assert_eq!(fdb_to_n3(&lab), 1);
    assert!(lab
        .ip(1, &["neigh", "show", "dev", "veilvx1"])
        .contains("10.244.3.0"));

    // Node-3 goes away for good: its kubelet and agent stop, then its Node object is deleted
    // (a running kubelet would register it again, as a real one does).
    lab.kill_daemon("kubelet-node-3");
    lab.kill_daemon("agent-node-3");
    lab.kubectl_ok(&["delete", "node", "node-3"]);
    eventually(
        Duration::from_secs(10),
        "node-3's route, FDB and neighbour entries vanish",
        || {
            routes_to_n3(&lab).is_empty()
                && fdb_to_n3(&lab) == 0
                && !lab
                    .ip(1, &["neigh", "show", "dev", "veilvx1"])
                    .contains("10.244.3.0")
        },
    );
    // Node-2's entries are still there.
    assert!(!lab.ip(1, &["route", "show", "10.244.2.0/24"]).is_empty());
}

#[test]
fn malformed_and_lying_peers_are_ignored() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("bad", &["--nodes", "2", "--encryption", "off"]);
    eventually(Duration::from_secs(20), "node-1 routes to node-2", || {
        !lab.ip(1, &["route", "show", "10.244.2.0/24"]).is_empty()
    });
    let rogue = |name: &str, cidr: &str, anns: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": anns},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        })
        .to_string()
    };
    // Garbage in every field.
    lab.apply(&rogue(
        "rogue-garbage",
        "10.244.50.0/24",
        serde_json::json!({"veilnet.io/underlay-ip": "300.1.2.3", "veilnet.io/vtep-mac": "zz:zz", "veilnet.io/vxlan-vni": "-1"}),
    ));
    // Well-formed, but claims node-1's pod CIDR in its annotation while the cluster gave it another.
    lab.apply(&rogue(
        "rogue-liar",
        "10.244.60.0/24",
        serde_json::json!({"veilnet.io/underlay-ip": "172.30.0.99", "veilnet.io/vtep-mac": "06:00:00:00:00:99",
                           "veilnet.io/pod-cidrs": "10.244.1.0/24"}),
    ));
    // The cluster records the liar's address (its kubelet would), so only the CIDR lie remains.
    record_address(&lab, "rogue-liar", "172.30.0.99");
    eventually(
        Duration::from_secs(10),
        "node-2 accepts the liar only for its own CIDR",
        || !lab.ip(2, &["route", "show", "10.244.60.0/24"]).is_empty(),
    );
    // Node-1's CIDR is still routed to node-1 only; the garbage node gets nothing.
    let to_n1 = lab.ip(2, &["route", "show", "10.244.1.0/24"]);
    assert!(to_n1.contains("via 10.244.1.0"), "{to_n1}");
    assert!(lab.ip(2, &["route", "show", "10.244.50.0/24"]).is_empty());
    // Both agents are alive and said why.
    assert!(lab.daemon_pid("agent-node-1").is_some() && lab.daemon_pid("agent-node-2").is_some());
    let log = std::fs::read_to_string(format!(
        "/var/lib/veilnet-lab/{}/logs/agent-node-2.log",
        lab.name
    ))
    .unwrap();
    assert!(
        log.contains("rogue-garbage") && log.contains("peer ignored"),
        "{log}"
    );
    // And a Warning event is on the garbage node.
    let events = lab.kubectl_ok(&[
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.name=rogue-garbage",
    ]);
    assert!(events.contains("VeilnetPeerRejected"), "{events}");
}

#[test]
fn full_size_packets_cross_at_the_computed_pod_mtu() {
    veilnet_test_support::require_root!();
    // Pods get the WireGuard MTU (underlay − 60) whatever the path, so a live toggle never
    // strands a pod with packets too big for the new path.
    for (underlay, pod_mtu) in [(1500u32, 1440u32), (9000, 8940), (1400, 1340)] {
        let lab = Lab::up(
            "mtu",
            &["--nodes", "2", "--underlay-mtu", &underlay.to_string()],
        );
        // The bridge is planned at the pods' MTU before any pod joins, so a joining pod (whose
        // veth the kernel would otherwise lower it to) changes nothing.
        let bridge_mtu = || {
            let link = lab.ip(1, &["link", "show", "veilbr0"]);
            assert!(link.contains(&format!("mtu {pod_mtu} ")), "{link}");
        };
        eventually(Duration::from_secs(10), "node-1's bridge exists", || {
            lab.ip(1, &["-o", "link", "show"]).contains("veilbr0")
        });
        bridge_mtu();
        lab.apply(&pod_manifest("default", "a", "node-1", &[], SERVE));
        lab.apply(&pod_manifest("default", "b", "node-2", &[], SERVE));
        let ip = lab.wait_pod_ip("default/a", Duration::from_secs(60));
        lab.wait_pod_ip("default/b", Duration::from_secs(60));
        // Host -> local pod at the full pod MTU, DF set: nothing is dropped at the pod's port.
        let host_ping = ok(Command::new("ip").args([
            "netns",
            "exec",
            &lab.node_netns(1),
            "ping",
            "-c2",
            "-W2",
            "-M",
            "do",
            "-s",
            &(pod_mtu - 28).to_string(),
            &ip,
        ]));
        assert!(host_ping.contains(" 0% packet loss"), "{host_ping}");
        bridge_mtu();
        let link = String::from_utf8_lossy(
            &lab.exec("default/b", &["ip", "link", "show", "eth0"])
                .stdout,
        )
        .to_string();
        assert!(link.contains(&format!("mtu {pod_mtu}")), "{link}");
        let size = (pod_mtu - 28).to_string();
        let ping = lab.exec(
            "default/b",
            &["ping", "-c2", "-W2", "-M", "do", "-s", &size, &ip],
        );
        assert!(
            ping.status.success(),
            "DF ping of {size} bytes at underlay {underlay}:\n{}",
            text(&ping)
        );
        let too_big = lab.exec(
            "default/b",
            &[
                "ping",
                "-c1",
                "-W1",
                "-M",
                "do",
                "-s",
                &(pod_mtu - 27).to_string(),
                &ip,
            ],
        );
        assert!(!too_big.status.success());
    }
}

/// The datapath SIGKILLed 20 times, every 2 s, under one encrypted TCP stream (the container
/// restarting as a kubelet would restart it, here `lab up`): the stream survives all of them.
#[test]
fn a_stream_survives_twenty_datapath_kills() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("dpkill20", &["--nodes", "2"]);
    let ip = iperf_server_and_client(&lab);
    wait_path(
        &lab,
        "node-2",
        "node-1",
        "wireguard",
        Duration::from_secs(30),
    );
    const KILLS: u32 = 20;
    let stream = reverse_stream(&lab, &ip, KILLS * 2 + 6);
    std::thread::sleep(Duration::from_secs(2));
    let mut pids = BTreeSet::new();
    for _ in 0..KILLS {
        pids.insert(
            lab.daemon_pid("datapath-node-1")
                .expect("the datapath runs"),
        );
        lab.kill_daemon("datapath-node-1");
        lab.up_again();
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(
        pids.len(),
        KILLS as usize,
        "not every kill hit a new process"
    );
    let report = stream_report(&lab, stream, "twenty datapath restarts");
    let (longest, intervals) = longest_stall(&report);
    let stalled = report["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["sum"]["bytes"].as_f64().unwrap_or(0.0) == 0.0)
        .count();
    let mbps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6;
    eprintln!(
        "{KILLS} datapath kills under one stream: it survived; longest stall {longest:.2} s, \
         {stalled} of {intervals} 0.2 s intervals empty, {mbps:.1} Mbit/s on average (50 offered)"
    );
    assert!(
        longest <= 3.0,
        "the stream stalled {longest:.2} s across a datapath restart"
    );
}
