//! Pod egress in the lab (`lab up --external-host`, needs root): traffic from a pod to a host
//! outside the cluster leaves with its node's underlay address (masquerade), pod-to-pod traffic on
//! every path keeps the pod's address, `nonMasqueradeCidrs` and the per-node opt-out leave the
//! pod's address on (and the reply has no way back), and NetworkPolicy judges egress on the pod's
//! address, before SNAT.
//!
//! Control planes: both (masquerade is the agent's and the kernel's; the control plane only
//! carries the pods and policies, and the real one must carry them the same way).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// The lab of every test here: two nodes and the external host (encryption on, the default).
const UP: &[&str] = &["--nodes", "2", "--external-host"];
/// The external host's server port (tests/lab/src/layout.rs `EXTERNAL_PORT`).
const EXT_PORT: u16 = 8080;

/// A pod server that answers with the client's address.
const SERVE_REPORTING: &[&str] = &[
    "veilnet",
    "lab",
    "agnhost",
    "serve",
    "--tcp",
    "80",
    "--udp",
    "80",
    "--report-client",
];

fn external(lab: &Lab) -> (String, String) {
    let st = lab.status_json();
    let ext = &st["externalHost"];
    assert_eq!(ext["running"], true, "{st}");
    assert_eq!(ext["port"], EXT_PORT);
    (
        ext["ip"].as_str().unwrap().to_string(),
        ext["netns"].as_str().unwrap().to_string(),
    )
}

fn node_ip(lab: &Lab, node: usize) -> String {
    let st = lab.status_json();
    st["nodes"][node - 1]["underlayIp"]
        .as_str()
        .unwrap()
        .to_string()
}

/// One probe from `pod`: the exit code and the source address the server reported.
fn ask(lab: &Lab, pod: &str, target: &str, proto: &str, timeout: &str) -> (Option<i32>, String) {
    let out = lab.connect_output(pod, target, proto, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let seen = stdout
        .trim()
        .rsplit_once(" from ")
        .map(|(_, ip)| ip.to_string())
        .unwrap_or_default();
    (out.status.code(), seen)
}

/// Asks until answered (policy and routes settle right after pod start), then says who was seen.
fn seen_by(lab: &Lab, pod: &str, target: &str, proto: &str) -> String {
    let mut last = (None, String::new());
    for _ in 0..30 {
        last = ask(lab, pod, target, proto, "2s");
        if last.0 == Some(0) {
            return last.1;
        }
    }
    panic!(
        "{pod} -> {target}/{proto}: no answer (last exit {:?})\n{}",
        last.0,
        lab.logs()
    );
}

fn pods(lab: &Lab) -> Vec<(String, usize, String)> {
    let mut out = Vec::new();
    for (name, node) in [("a1", 1), ("a2", 1), ("b1", 2)] {
        lab.apply(&pod_manifest(
            "default",
            name,
            &format!("node-{node}"),
            &[("app", name)],
            SERVE_REPORTING,
        ));
        out.push((name.to_string(), node, String::new()));
    }
    for p in &mut out {
        p.2 = lab.wait_pod_ip(&format!("default/{}", p.0), Duration::from_secs(60));
    }
    out
}

/// The external host's log so far: one `tcp|udp from IP:PORT` line per request it received.
fn external_log(lab: &Lab) -> String {
    std::fs::read_to_string(format!(
        "/var/lib/veilnet-lab/{}/logs/external.log",
        lab.name
    ))
    .unwrap_or_default()
}

/// The external host's `Ip: OutNoRoutes` (packets it could not send for want of a route).
fn out_no_routes(lab: &Lab) -> u64 {
    let snmp = ok(Command::new("ip").args([
        "netns",
        "exec",
        &format!("{}.ext", lab.name),
        "cat",
        "/proc/net/snmp",
    ]));
    let ip: Vec<Vec<&str>> = snmp
        .lines()
        .filter(|l| l.starts_with("Ip: "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let col = ip[0].iter().position(|h| *h == "OutNoRoutes").unwrap();
    ip[1][col].parse().unwrap()
}

/// `veilnet lab up` again with `env` set: restarts what is not running (a killed agent) with it.
fn up_again_with(lab: &Lab, env: &[(&str, &str)]) {
    let mut cmd = veilnet();
    cmd.args(["lab", "up", "--name", &lab.name]).args(UP);
    for (k, v) in env {
        cmd.env(k, v);
    }
    ok(&mut cmd);
}

#[test]
fn pods_reach_the_external_host_masqueraded_and_each_other_with_their_own_address() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("egress", UP);
    let (ext_ip, ext_ns) = external(&lab);
    // Shown in the text status too, and idempotent: `up` again changes nothing.
    let text = ok(veilnet().args(["lab", "status", "--name", &lab.name]));
    assert!(
        text.contains(&format!(
            "external host: netns {ext_ns}, {ext_ip} tcp+udp port 8080"
        )),
        "{text}"
    );
    lab.up_again();
    assert_eq!(external(&lab).0, ext_ip);
    // The node reaches it directly on the underlay: no default route needed.
    let route = lab.ip(1, &["route", "get", &ext_ip]);
    assert!(
        route.contains("dev eth0") && !route.contains(" via "),
        "{route}"
    );

    let pods = pods(&lab);
    let target = format!("{ext_ip}:{EXT_PORT}");
    for (pod, node, _) in &pods {
        let want = node_ip(&lab, *node);
        for proto in ["tcp", "udp"] {
            let seen = seen_by(&lab, &format!("default/{pod}"), &target, proto);
            assert_eq!(seen, want, "{pod} on node-{node} -> external ({proto})");
        }
    }
    let log = external_log(&lab);
    assert!(
        !log.contains("from 10.244."),
        "a pod address leaked:\n{log}"
    );

    // Pod to pod: same node (bridge), across nodes (WireGuard, then VXLAN): the receiver sees
    // the sender's own address, never a node's.
    let ip_of = |name: &str| pods.iter().find(|p| p.0 == name).unwrap().2.clone();
    let check_pod_to_pod = |what: &str| {
        for (from, to) in [("a1", "a2"), ("a1", "b1"), ("b1", "a1")] {
            for proto in ["tcp", "udp"] {
                let seen = seen_by(
                    &lab,
                    &format!("default/{from}"),
                    &format!("{}:80", ip_of(to)),
                    proto,
                );
                assert_eq!(seen, ip_of(from), "{what}: {from} -> {to} ({proto})");
            }
        }
    };
    assert_eq!(path_to(&lab, "node-1", "node-2"), "wireguard");
    check_pod_to_pod("encrypted");
    set_mode(&lab, "node-2", "off");
    wait_path(&lab, "node-1", "node-2", "vxlan", Duration::from_secs(20));
    wait_path(&lab, "node-2", "node-1", "vxlan", Duration::from_secs(20));
    check_pod_to_pod("plaintext");
    // Egress is not pod-to-pod: masqueraded on the plaintext node too.
    assert_eq!(
        seen_by(&lab, "default/b1", &target, "udp"),
        node_ip(&lab, 2)
    );
    // The chain counted the connections it masqueraded.
    let nft = ok(Command::new("ip").args([
        "netns",
        "exec",
        &lab.node_netns(1),
        "nft",
        "list",
        "counter",
        "inet",
        "veilnet_wire",
        "masqueraded",
    ]));
    assert!(!nft.contains("packets 0 "), "{nft}");
    // `veilnet status` reports it as masqueraded connections, not as a wire drop.
    eventually(
        Duration::from_secs(10),
        "node-1's status counts masquerading",
        || {
            let out = veilnet()
                .args(["status", "--lab", &lab.name, "--node", "node-1", "--json"])
                .output()
                .unwrap();
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            assert!(st["wireDrops"].get("masqueraded").is_none(), "{st}");
            st["masqueraded"].as_u64().unwrap_or(0) > 0
        },
    );
}

#[test]
fn non_masquerade_cidrs_and_the_opt_out_leave_the_pod_address_and_no_way_back() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("egress-nm", UP);
    let (ext_ip, _) = external(&lab);
    let pods = pods(&lab);
    let target = format!("{ext_ip}:{EXT_PORT}");
    let ip_of = |name: &str| pods.iter().find(|p| p.0 == name).unwrap().2.clone();
    // Masqueraded first, so the routes and policy are in place before the change.
    assert_eq!(
        seen_by(&lab, "default/a1", &target, "udp"),
        node_ip(&lab, 1)
    );
    assert_eq!(
        seen_by(&lab, "default/b1", &target, "udp"),
        node_ip(&lab, 2)
    );

    // node-1: the external host in nonMasqueradeCidrs; node-2: opted out (each agent restarted
    // with the setting; the lab passes its environment to the daemons it starts).
    let cidr = format!("{ext_ip}/32");
    lab.kill_daemon("agent-node-1");
    up_again_with(&lab, &[("VEILNET_NON_MASQUERADE_CIDRS", &cidr)]);
    lab.kill_daemon("agent-node-2");
    up_again_with(&lab, &[("VEILNET_MASQUERADE", "false")]);
    let nft = |node: usize| {
        ok(Command::new("ip").args([
            "netns",
            "exec",
            &lab.node_netns(node),
            "nft",
            "list",
            "table",
            "inet",
            "veilnet_wire",
        ]))
    };
    eventually(
        Duration::from_secs(20),
        "node-1 leaves the external host alone",
        || nft(1).contains(&format!("elements = {{ {ext_ip} }}")),
    );
    eventually(
        Duration::from_secs(20),
        "node-2 masquerades nothing",
        || !nft(2).contains("masquerade fully-random"),
    );

    for (pod, proto) in [("a1", "udp"), ("a1", "tcp"), ("b1", "udp"), ("b1", "tcp")] {
        let (code, _) = ask(&lab, &format!("default/{pod}"), &target, proto, "2s");
        // The external host has no route to the pod CIDRs: the answer never comes back.
        assert_eq!(code, Some(1), "{pod} -> external ({proto}) must time out");
    }
    // ...but the requests arrived, from the pods' own addresses.
    let log = external_log(&lab);
    for pod in ["a1", "b1"] {
        assert!(
            log.contains(&format!("udp from {}:", ip_of(pod))),
            "the external host never saw {pod}'s address:\n{log}"
        );
    }
    // The external host's kernel found no route back (its SYN-ACKs and answers): counted.
    assert!(
        out_no_routes(&lab) > 0,
        "the external host dropped no reply for want of a route"
    );
    // Pod to pod is untouched.
    assert_eq!(
        seen_by(&lab, "default/a1", &format!("{}:80", ip_of("b1")), "tcp"),
        ip_of("a1")
    );
}

#[test]
fn egress_policy_judges_the_pod_address_before_snat() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("egress-np", UP);
    let (ext_ip, _) = external(&lab);
    let pods = pods(&lab);
    let ip_of = |name: &str| pods.iter().find(|p| p.0 == name).unwrap().2.clone();
    let target = format!("{ext_ip}:{EXT_PORT}");
    assert_eq!(
        seen_by(&lab, "default/a1", &target, "tcp"),
        node_ip(&lab, 1)
    );
    let policy = |name: &str, egress: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "a1"}}, "policyTypes": ["Egress"],
                     "egress": egress}
        })
        .to_string()
    };
    lab.apply(&policy("deny-egress", serde_json::json!([])));
    eventually(
        Duration::from_secs(20),
        "default-deny egress blocks the external host",
        || {
            ask(&lab, "default/a1", &target, "tcp", "1s").0 == Some(1)
                && ask(&lab, "default/a1", &target, "udp", "1s").0 == Some(1)
        },
    );
    // Other pods are not selected.
    assert_eq!(
        seen_by(&lab, "default/a2", &target, "udp"),
        node_ip(&lab, 1)
    );
    // An ipBlock for the external host's /32 lets it through: judged on the pod's address and
    // the external destination, before the SNAT in postrouting.
    lab.apply(&policy(
        "allow-external",
        serde_json::json!([{"to": [{"ipBlock": {"cidr": format!("{ext_ip}/32")}}]}]),
    ));
    for proto in ["tcp", "udp"] {
        assert_eq!(
            seen_by(&lab, "default/a1", &target, proto),
            node_ip(&lab, 1),
            "{proto}"
        );
    }
    // ...and nothing else: pod b1 is not in the block.
    let (code, _) = ask(
        &lab,
        "default/a1",
        &format!("{}:80", ip_of("b1")),
        "tcp",
        "1s",
    );
    assert_eq!(code, Some(1), "a1 -> b1 is denied by the default deny");
}
