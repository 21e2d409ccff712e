//! NetworkPolicy in the lab, as a user checks it (needs root):
//! - the upstream Kubernetes netpol e2e scenarios (`veilnet_lab::scenarios`, the same data the
//!   pure truth-table test checks) probed as a 9×9 matrix over three nodes;
//! - anti-spoofing: a pod forging an ARP reply or a source IP gets nothing through; a pod can
//!   never move another MAC on the bridge (link-local groups or ordinary frames), nor grow the FDB;
//! - no race at pod start: under default deny, a hammered new pod gets 0 packets in;
//! - pod and namespace label changes take effect within a second; counters, flow log and
//!   `veilnet policy explain` report what decided.
//!
//! The tests of this file run one after another (each builds a lab; two cores are not enough for
//! several labs with one-second probe timeouts).
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use veilnet::policy::Protocol;
use veilnet_lab::scenarios::{self, LabelChange, Step, N, NAMESPACES, PODS};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn namespace_manifest(ns: &str) -> String {
    serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"ns": ns}}})
    .to_string()
}

/// Upstream's model pod: label `pod=<name>`, serving 80 and 81 on TCP and UDP, with the named
/// ports the named-port scenarios use (SCTP ones declared too, as upstream does).
fn model_pod_manifest(ns: &str, pod: &str, node: &str) -> String {
    let mut ports = Vec::new();
    for port in [80, 81] {
        for proto in ["TCP", "UDP", "SCTP"] {
            ports.push(
                serde_json::json!({"name": format!("serve-{port}-{}", proto.to_lowercase()),
                "containerPort": port, "protocol": proto}),
            );
        }
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "agnhost",
            "command": SERVE, "ports": ports}]}})
    .to_string()
}

/// The x/y/z × a/b/c model in a 3-node lab: pod a on node-1, b on node-2, c on node-3.
struct Model {
    lab: Lab,
    netns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl Model {
    fn up(tag: &str) -> Model {
        let lab = Lab::up(tag, &["--nodes", "3"]);
        for ns in NAMESPACES {
            lab.apply(&namespace_manifest(ns));
        }
        for ns in NAMESPACES {
            for (i, pod) in PODS.iter().enumerate() {
                lab.apply(&model_pod_manifest(ns, pod, &format!("node-{}", i + 1)));
            }
        }
        let mut ips = Vec::new();
        for i in 0..N {
            let ip = lab.wait_pod_ip(&scenarios::name_of(i), Duration::from_secs(90));
            ips.push(ip.parse().unwrap());
        }
        let status = lab.status_json();
        let netns = (0..N)
            .map(|i| {
                let name = scenarios::name_of(i);
                status["pods"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| {
                        format!(
                            "{}/{}",
                            p["namespace"].as_str().unwrap(),
                            p["name"].as_str().unwrap()
                        ) == name
                    })
                    .and_then(|p| p["netns"].as_str())
                    .unwrap()
                    .to_string()
            })
            .collect();
        Model { lab, netns, ips }
    }

    fn ip_of(&self, ns: &str, pod: &str) -> IpAddr {
        let n = NAMESPACES.iter().position(|x| *x == ns).unwrap();
        let p = PODS.iter().position(|x| *x == pod).unwrap();
        self.ips[n * 3 + p]
    }

    /// Probes every non-loopback pair in parallel: `Some(exit code)` per pair.
    fn probe(&self, port: u16, protocol: Protocol) -> Vec<Vec<Option<i32>>> {
        let proto = match protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => unreachable!("SCTP is not probed"),
        };
        let pairs: Vec<(usize, usize)> = (0..N)
            .flat_map(|f| (0..N).map(move |t| (f, t)))
            .filter(|(f, t)| f != t)
            .collect();
        let codes = par_map(&pairs, 24, |(f, t)| {
            probe_in(
                &self.netns[*f],
                &format!("{}:{port}", self.ips[*t]),
                proto,
                "1s",
            )
        });
        let mut out = vec![vec![Some(0); N]; N];
        for ((f, t), code) in pairs.iter().zip(codes) {
            out[*f][*t] = code;
        }
        out
    }

    /// Mismatches between a probed matrix and the step's expectation.
    #[allow(clippy::needless_range_loop)] // (from, to) pairs of the matrix read clearer by index
    fn diff(&self, got: &[Vec<Option<i32>>], step: &Step) -> Vec<String> {
        let mut out = Vec::new();
        for f in 0..N {
            for t in 0..N {
                if f != t && (got[f][t] == Some(0)) != step.want.allowed(f, t) {
                    out.push(format!(
                        "{} -> {} {}/{}: want {}, probe exit {:?}",
                        scenarios::name_of(f),
                        scenarios::name_of(t),
                        step.protocol,
                        step.port,
                        if step.want.allowed(f, t) {
                            "allowed"
                        } else {
                            "denied"
                        },
                        got[f][t]
                    ));
                }
            }
        }
        out
    }

    /// Waits until every agent has synced exactly `count` policies (no sync error).
    fn wait_policies(&self, count: usize) {
        eventually(
            Duration::from_secs(10),
            &format!("{count} policies synced on every node"),
            || {
                (1..=3).all(|n| {
                    let s = self.lab.policy_status(n);
                    s["policiesTotal"] == count && s["lastError"].is_null()
                })
            },
        );
    }
}

fn policy_key(p: &NetworkPolicy) -> (String, String) {
    (
        p.metadata.namespace.clone().unwrap(),
        p.metadata.name.clone().unwrap(),
    )
}

fn label(lab: &Lab, change: &LabelChange, add: bool) {
    let value = if add {
        format!("{}={}", change.key, change.value)
    } else {
        format!("{}-", change.key)
    };
    match change.pod {
        None => lab.kubectl_ok(&[
            "label",
            "namespace",
            change.namespace,
            &value,
            "--overwrite",
        ]),
        Some(pod) => lab.kubectl_ok(&[
            "label",
            "pod",
            "-n",
            change.namespace,
            pod,
            &value,
            "--overwrite",
        ]),
    };
}

/// Runs one scenario in the lab; returns the mismatches (empty: passed).
fn run_scenario(model: &Model, scenario: &scenarios::Scenario) -> Vec<String> {
    let lab = &model.lab;
    let mut applied: BTreeSet<(String, String)> = BTreeSet::new();
    let mut failures = Vec::new();
    for (i, step) in scenario.steps.iter().enumerate() {
        let wanted: BTreeSet<(String, String)> = step.policies.iter().map(policy_key).collect();
        for p in &step.policies {
            lab.apply(&serde_json::to_string(p).unwrap());
        }
        for (ns, name) in applied.difference(&wanted) {
            lab.kubectl_ok(&["delete", "networkpolicy", "-n", ns, name]);
        }
        applied = wanted;
        for change in &step.labels {
            label(lab, change, true);
        }
        model.wait_policies(applied.len());
        if step.protocol == Protocol::Sctp {
            // No SCTP in this kernel: the rules must still compile and load.
            let out = ok(Command::new("nft")
                .args(["list", "table", "inet", "veilnet"])
                .arg0_netns(&lab.node_netns(1)));
            let names_sctp = serde_json::to_string(&step.policies)
                .unwrap()
                .contains("SCTP");
            if names_sctp && !out.contains(&format!("sctp . {}", step.port)) {
                failures.push(format!(
                    "step {}: no SCTP element in node-1's ruleset:\n{out}",
                    i + 1
                ));
            }
            continue;
        }
        // Labels propagate through the watch; policies are synced. Retry a few rounds, as upstream
        // does, for the label steps and for the odd probe slowed down by a busy machine.
        let mut last = Vec::new();
        for attempt in 0..4 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let got = model.probe(step.port, step.protocol);
            last = model.diff(&got, step);
            if last.is_empty() {
                break;
            }
        }
        failures.extend(last.into_iter().map(|d| format!("step {}: {d}", i + 1)));
    }
    for (ns, name) in &applied {
        lab.kubectl_ok(&["delete", "networkpolicy", "-n", ns, name]);
    }
    for change in scenario.steps.iter().flat_map(|s| &s.labels) {
        label(lab, change, false);
    }
    model.wait_policies(0);
    failures
}

/// `Command` inside a netns, for the one-liners above.
trait InNetns {
    fn arg0_netns(&mut self, netns: &str) -> &mut Self;
}

impl InNetns for Command {
    fn arg0_netns(&mut self, netns: &str) -> &mut Self {
        veilnet::netns::command_in(netns, self).unwrap();
        self
    }
}

#[test]
fn upstream_netpol_scenarios_in_the_lab() {
    veilnet_test_support::require_root!();
    let _serial = serial();
    let started = Instant::now();
    let model = Model::up("np");
    let all = scenarios::upstream(&|ns, pod| model.ip_of(ns, pod));
    let mut failures = Vec::new();
    let (mut probed, mut sctp, mut steps) = (0, 0, 0);
    for s in &all {
        let f = run_scenario(&model, s);
        steps += s.steps.len();
        if s.steps.iter().all(|st| st.protocol == Protocol::Sctp) {
            sctp += 1;
        } else {
            probed += 1;
        }
        eprintln!(
            "[{:>5.1}s] {} {}",
            started.elapsed().as_secs_f64(),
            if f.is_empty() { "PASS" } else { "FAIL" },
            s.name
        );
        failures.extend(f.into_iter().map(|d| format!("[{}] {d}", s.name)));
    }
    eprintln!(
        "lab netpol: {probed} scenarios probed (TCP/UDP), {sctp} SCTP compiled+loaded, {steps} steps, {:.0}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        model.lab.logs()
    );
    assert_eq!((probed, sctp), (45, 3));
}

// ---- anti-spoofing ----

fn mac_of(netns: &str, dev: &str) -> [u8; 6] {
    let out = ok(Command::new("ip").args(["-n", netns, "-j", "link", "show", dev]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = v[0]["address"].as_str().unwrap();
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

/// Sends raw Ethernet frames out of `dev` from a thread inside `netns`.
fn send_frames(netns: &str, dev: &'static str, frames: Vec<Vec<u8>>) {
    let once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    send_rounds(netns, dev, frames, Duration::ZERO, once);
}

/// Sends `frames` out of `dev` in `netns` again and again, a round every `period`, until `stop`
/// (at least one round).
fn send_rounds(
    netns: &str,
    dev: &'static str,
    frames: Vec<Vec<u8>>,
    period: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    // SAFETY: plain AF_PACKET socket calls (nix cannot build the `sockaddr_ll` to send to one
    // interface) on a descriptor this closure owns and closes; every pointer passed refers to a
    // live, initialised value of the length given.
    veilnet::netns::run_in(netns, move || unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(dev).unwrap();
        let index = libc::if_nametoindex(name.as_ptr());
        assert!(index > 0);
        loop {
            for frame in &frames {
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = index as i32;
                addr.sll_halen = 6;
                addr.sll_addr[..6].copy_from_slice(&frame[..6]);
                let n = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert!(n > 0, "sendto: {}", std::io::Error::last_os_error());
            }
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(period);
        }
        libc::close(fd);
    })
    .unwrap();
}

fn arp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    op: u16,
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&src);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target_ip.octets());
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP frame carrying an agnhost request.
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
) -> Vec<u8> {
    let payload = b"veilnet-agnhost 1 spoof\n";
    let udp_len = 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend(ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    f.extend_from_slice(payload);
    f
}

/// Counts packets from `src` seen on the server pod's eth0 while `send` runs.
fn captured_from(server_netns: &str, src: Ipv4Addr, send: impl FnOnce()) -> usize {
    tcpdump_count(
        server_netns,
        &["-c", "1", "src", "host", &src.to_string()],
        send,
    )
}

#[test]
fn anti_spoofing_forged_arp_and_source_ip_get_nothing_through() {
    veilnet_test_support::require_root!();
    let _serial = serial();
    let lab = Lab::up("as", &["--nodes", "2"]);
    lab.apply(&namespace_manifest("x"));
    for (pod, node) in [("victim", 1), ("attacker", 1), ("server", 2)] {
        lab.apply(&pod_manifest(
            "x",
            pod,
            &format!("node-{node}"),
            &[("pod", pod)],
            SERVE,
        ));
    }
    let victim: Ipv4Addr = lab
        .wait_pod_ip("x/victim", Duration::from_secs(60))
        .parse()
        .unwrap();
    let attacker: Ipv4Addr = lab
        .wait_pod_ip("x/attacker", Duration::from_secs(60))
        .parse()
        .unwrap();
    let server: Ipv4Addr = lab
        .wait_pod_ip("x/server", Duration::from_secs(60))
        .parse()
        .unwrap();
    let attacker_ns = lab.pod_netns("x/attacker");
    let server_ns = lab.pod_netns("x/server");
    let node1 = lab.node_netns(1);
    let attacker_mac = mac_of(&attacker_ns, "eth0");
    let victim_mac = mac_of(&lab.pod_netns("x/victim"), "eth0");
    let bridge_mac = mac_of(&node1, "veilbr0");
    let gateway = Ipv4Addr::from(u32::from(victim) & 0xffff_ff00 | 1);

    // The node knows the victim's MAC (a probe from the node), and the entry is old enough to be
    // overridden by an ARP reply (locktime), so a forged reply would really poison it.
    let ping = ok(Command::new("ping")
        .args(["-c", "1", "-W", "2", &victim.to_string()])
        .arg0_netns(&node1));
    assert!(ping.contains("1 received"), "{ping}");
    std::thread::sleep(Duration::from_millis(1500));

    // ARP: "victim is at attacker's MAC", as a reply to the gateway and as a gratuitous request.
    send_frames(
        &attacker_ns,
        "eth0",
        vec![
            arp_frame(bridge_mac, attacker_mac, 2, victim, bridge_mac, gateway),
            arp_frame([0xff; 6], attacker_mac, 1, victim, [0; 6], victim),
            arp_frame(bridge_mac, attacker_mac, 2, victim, bridge_mac, gateway),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let neigh = lab.ip(1, &["neigh", "show", &victim.to_string()]);
    let fmt = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    assert!(!neigh.contains(&fmt(attacker_mac)), "ARP poisoned: {neigh}");
    assert!(neigh.contains(&fmt(victim_mac)), "{neigh}");

    // Source IP: a UDP request with the victim's address (right MAC) reaches nothing; the same
    // frame with the attacker's own address does (control: the capture works).
    let forged = captured_from(&server_ns, victim, || {
        send_frames(
            &attacker_ns,
            "eth0",
            vec![udp_frame(bridge_mac, attacker_mac, victim, server, 80); 5],
        );
    });
    assert_eq!(forged, 0, "a forged source IP got through");
    let honest = captured_from(&server_ns, attacker, || {
        send_frames(
            &attacker_ns,
            "eth0",
            vec![udp_frame(bridge_mac, attacker_mac, attacker, server, 80); 5],
        );
    });
    assert!(honest >= 1, "control: the honest frame did not arrive");

    // The flow log names the offender for both; the counter counted them.
    eventually(
        Duration::from_secs(5),
        "spoof records in node-1's flow log",
        || {
            let log = lab.flow_log(1);
            let spoof = |proto: &str| {
                log.iter().any(|r| {
                    r["verdict"] == "spoof"
                        && r["pod"] == "x/attacker"
                        && r["protocol"] == proto
                        && r["src"]["ip"] == victim.to_string()
                })
            };
            spoof("ARP") && spoof("UDP")
        },
    );
    eventually(
        Duration::from_secs(8),
        "the spoofed counter in policy-status.json",
        || {
            lab.policy_status(1)["counters"]["spoofed"]["packets"]
                .as_u64()
                .unwrap_or(0)
                >= 8
        },
    );
}

// ---- MAC theft and FDB flooding on the bridge ----

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A minimum-size Ethernet frame.
fn l2_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.resize(60, 0);
    f
}

const LLDP: u16 = 0x88cc;

/// `01:80:c2:00:00:0X`.
fn link_local(group: u8) -> [u8; 6] {
    [0x01, 0x80, 0xc2, 0, 0, group]
}

/// node-1's bridge FDB: (MAC, port, static).
fn bridge_fdb(lab: &Lab) -> Vec<(String, String, bool)> {
    let out = ok(Command::new("bridge")
        .args(["-j", "fdb", "show", "br", "veilbr0"])
        .arg0_netns(&lab.node_netns(1)));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["mac"].as_str().unwrap_or("").to_string(),
                e["ifname"].as_str().unwrap_or("").to_string(),
                e["state"] == "static" || e["state"] == "permanent",
            )
        })
        .collect()
}

/// The bridge ports `mac` is on (normally exactly one).
fn ports_of(lab: &Lab, mac: [u8; 6]) -> Vec<String> {
    let mac = mac_text(mac);
    bridge_fdb(lab)
        .into_iter()
        .filter(|(m, _, _)| *m == mac)
        .map(|(_, port, _)| port)
        .collect()
}

/// The kernel's `spoofed` counter on node-1 (exact, unlike the status file's few-second lag).
fn spoofed_packets(lab: &Lab) -> u64 {
    let out = ok(Command::new("nft")
        .args(["-j", "list", "counter", "bridge", "veilnet", "spoofed"])
        .arg0_netns(&lab.node_netns(1)));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o["counter"]["packets"].as_u64())
        .unwrap()
}

/// Two pods on node-1 (`victim`, `attacker`), a `client` on node-2 whose traffic to the victim
/// crosses the underlay encrypted.
struct Theft {
    lab: Lab,
    victim: Ipv4Addr,
    client: Ipv4Addr,
    victim_mac: [u8; 6],
    bridge_mac: [u8; 6],
    attacker_ns: String,
    victim_ns: String,
    client_ns: String,
}

impl Theft {
    fn up(tag: &str) -> Theft {
        let lab = Lab::up(tag, &["--nodes", "2"]);
        lab.apply(&namespace_manifest("x"));
        for (pod, node) in [("victim", 1), ("attacker", 1), ("client", 2)] {
            lab.apply(&pod_manifest(
                "x",
                pod,
                &format!("node-{node}"),
                &[("pod", pod)],
                SERVE,
            ));
        }
        let ip = |pod: &str| -> Ipv4Addr {
            lab.wait_pod_ip(pod, Duration::from_secs(60))
                .parse()
                .unwrap()
        };
        let (victim, client) = (ip("x/victim"), ip("x/client"));
        ip("x/attacker");
        let victim_ns = lab.pod_netns("x/victim");
        Theft {
            victim,
            client,
            victim_mac: mac_of(&victim_ns, "eth0"),
            bridge_mac: mac_of(&lab.node_netns(1), "veilbr0"),
            attacker_ns: lab.pod_netns("x/attacker"),
            client_ns: lab.pod_netns("x/client"),
            victim_ns,
            lab,
        }
    }
}

#[test]
fn mac_theft_by_any_frame_never_moves_the_victims_mac() {
    veilnet_test_support::require_root!();
    let _serial = serial();
    let t = Theft::up("mt");
    let lab = &t.lab;
    // The victim talks (its port is where its MAC lives) and is reachable across the underlay.
    assert_eq!(
        probe_in(&t.victim_ns, &format!("{}:80", t.client), "udp", "2s"),
        Some(0)
    );
    let home = ports_of(lab, t.victim_mac);
    assert_eq!(home.len(), 1, "{home:?}");

    // Every link-local group, and ordinary frames (broadcast, to the gateway, ARP and IPv4 in
    // the victim's name), all with the victim's MAC as the source.
    let gateway = Ipv4Addr::from(u32::from(t.victim) & 0xffff_ff00 | 1);
    let mut frames: Vec<Vec<u8>> = (0..16u8)
        .map(|g| l2_frame(link_local(g), t.victim_mac, LLDP))
        .collect();
    frames.push(l2_frame([0xff; 6], t.victim_mac, 0x88b5));
    frames.push(l2_frame(t.bridge_mac, t.victim_mac, 0x88b5));
    frames.push(arp_frame(
        [0xff; 6],
        t.victim_mac,
        1,
        t.victim,
        [0; 6],
        gateway,
    ));
    frames.push(udp_frame(
        t.bridge_mac,
        t.victim_mac,
        t.victim,
        t.client,
        80,
    ));
    let per_round = frames.len() as u64;

    // One round first: every frame of it counted (but 01:80:c2:00:00:01, pause, which the
    // bridge drops itself before any hook), each group logged as spoof.
    let before = spoofed_packets(lab);
    send_frames(&t.attacker_ns, "eth0", frames.clone());
    std::thread::sleep(Duration::from_millis(200));
    let one_round = spoofed_packets(lab) - before;
    let moved_after_one_round = ports_of(lab, t.victim_mac) != home;

    // Then the attack of the issue: a round every 5 ms, while the client and the victim probe
    // each other and a capture on the attacker looks for the victim's traffic.
    let attacker_ns = t.attacker_ns.clone();
    let attack_frames = frames.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_attack = stop.clone();
    let attack = std::thread::spawn(move || {
        send_rounds(
            &attacker_ns,
            "eth0",
            attack_frames,
            Duration::from_millis(5),
            stop_attack,
        )
    });
    let mut moved_during = Vec::new();
    let mut answered = (0, 0);
    let victim_ip = t.victim.to_string();
    let stolen = tcpdump_count(
        &t.attacker_ns,
        &["ip", "and", "dst", "host", &victim_ip],
        || {
            for _ in 0..5 {
                let to_victim = format!("{}:80", t.victim);
                answered.0 +=
                    usize::from(probe_in(&t.client_ns, &to_victim, "udp", "1s") == Some(0));
                let to_client = format!("{}:80", t.client);
                answered.1 +=
                    usize::from(probe_in(&t.victim_ns, &to_client, "udp", "1s") == Some(0));
                moved_during.push(ports_of(lab, t.victim_mac));
            }
        },
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attack.join().unwrap();
    let moved = moved_during.iter().filter(|p| **p != home).count();
    let fdb = bridge_fdb(lab);
    let learned = fdb.iter().filter(|(_, _, is_static)| !is_static).count();
    eprintln!(
        "mac theft: one round of {per_round} frames counted {one_round}; victim MAC moved after \
         one round: {moved_after_one_round}, in {moved}/5 samples during the attack \
         ({moved_during:?}, home {home:?}); attacker captured {stolen} packets to the victim; \
         client->victim answered {}/5, victim->client {}/5; learned FDB entries {learned}",
        answered.0, answered.1
    );
    assert!(
        !moved_after_one_round && moved == 0,
        "the victim's MAC moved"
    );
    assert_eq!(stolen, 0, "the attacker received the victim's traffic");
    assert_eq!(
        answered,
        (5, 5),
        "the victim's traffic failed during the attack"
    );
    assert_eq!(learned, 0, "the bridge learned from a pod: {fdb:?}");
    assert!(
        one_round >= per_round - 1,
        "counted {one_round} of {per_round}"
    );
    let log_groups = |log: &[serde_json::Value]| -> BTreeSet<String> {
        log.iter()
            .filter(|r| {
                r["verdict"] == "spoof"
                    && r["pod"] == "x/attacker"
                    && r["protocol"] == "ether-0x88cc"
                    && r["src"]["mac"] == mac_text(t.victim_mac)
            })
            .filter_map(|r| r["dst"]["mac"].as_str().map(String::from))
            .collect()
    };
    let want: BTreeSet<String> = (0..16u8)
        .filter(|g| *g != 1)
        .map(|g| mac_text(link_local(g)))
        .collect();
    eventually(
        Duration::from_secs(5),
        "a spoof line for every link-local group but pause in node-1's flow log",
        || log_groups(&lab.flow_log(1)).is_superset(&want),
    );
    eventually(
        Duration::from_secs(8),
        "the spoofed counter in policy-status.json",
        || {
            lab.policy_status(1)["counters"]["spoofed"]["packets"]
                .as_u64()
                .unwrap_or(0)
                >= one_round
        },
    );
}

#[test]
fn fdb_flooding_100000_source_macs_from_one_pod_leaves_the_fdb_unchanged() {
    veilnet_test_support::require_root!();
    let _serial = serial();
    let t = Theft::up("ff");
    let lab = &t.lab;
    let before = bridge_fdb(lab).len();
    // 100,000 distinct locally administered source MACs, to every link-local group and to
    // broadcast in turn.
    let frames: Vec<Vec<u8>> = (0..100_000u32)
        .map(|i| {
            let b = i.to_be_bytes();
            let src = [0x02, 0xee, b[0], b[1], b[2], b[3]];
            let dst = match i % 17 {
                16 => [0xff; 6],
                g => link_local(g as u8),
            };
            l2_frame(dst, src, LLDP)
        })
        .collect();
    let sent = Instant::now();
    send_frames(&t.attacker_ns, "eth0", frames);
    let took = sent.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = bridge_fdb(lab);
    eprintln!(
        "fdb flooding: {before} FDB entries before, {} after 100,000 source MACs (sent in {took:?})",
        after.len()
    );
    assert_eq!(after.len(), before, "the FDB grew");
    // The bound, as defence in depth.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bridge = runtime.block_on(async {
        use veilnet::kernel::OverlayKernel;
        let mut k = veilnet::kernel::NetlinkKernel::connect_in(&lab.node_netns(1)).unwrap();
        let links = k.dump_links().await.unwrap();
        links.into_iter().find(|l| l.name == "veilbr0").unwrap()
    });
    assert_eq!(
        bridge.bridge,
        Some(veilnet::kernel::POD_BRIDGE_OPTIONS),
        "{bridge:?}"
    );
    // The victim still reaches and is reached.
    assert_eq!(
        probe_in(&t.client_ns, &format!("{}:80", t.victim), "udp", "2s"),
        Some(0)
    );

    // A port as pods had them before veilnet pinned MACs (learning, flooding, no static entry)
    // is repaired by the agent's housekeeping.
    let mac = mac_text(t.victim_mac);
    let port = ports_of(lab, t.victim_mac).pop().unwrap();
    let node1 = lab.node_netns(1);
    lab.ip(
        1,
        &[
            "link",
            "set",
            "dev",
            &port,
            "type",
            "bridge_slave",
            "learning",
            "on",
            "flood",
            "on",
            "group_fwd_mask",
            "0",
        ],
    );
    ok(Command::new("bridge")
        .args(["fdb", "del", &mac, "dev", &port, "master"])
        .arg0_netns(&node1));
    let port_state = || {
        let v: serde_json::Value =
            serde_json::from_str(&lab.ip(1, &["-d", "-j", "link", "show", "dev", &port])).unwrap();
        let data = &v[0]["linkinfo"]["info_slave_data"];
        (data["learning"].clone(), data["flood"].clone())
    };
    assert_eq!(port_state().0, true);
    eventually(
        Duration::from_secs(8),
        "the agent repairs the victim's port",
        || {
            port_state() == (false.into(), false.into())
                && bridge_fdb(lab).contains(&(mac.clone(), port.clone(), true))
        },
    );
}

// ---- no race at pod start ----

/// Hammers UDP port 80 of every address in `ips` from a thread in `netns` until `stop`; returns
/// per address how many probes got an answer or an ICMP error back (either proves a packet
/// reached a pod).
fn hammer(
    netns: &str,
    ips: Vec<Ipv4Addr>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<std::collections::HashMap<Ipv4Addr, usize>> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        veilnet::netns::run_in(&netns, move || {
            let sockets: Vec<std::net::UdpSocket> = ips
                .iter()
                .map(|ip| {
                    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.connect((*ip, 80)).unwrap();
                    s.set_nonblocking(true).unwrap();
                    s
                })
                .collect();
            let mut reached = std::collections::HashMap::new();
            let mut buf = [0u8; 512];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &sockets {
                    let _ = s.send(b"veilnet-agnhost 7 hammer\n");
                }
                std::thread::sleep(Duration::from_millis(5));
                for (s, ip) in sockets.iter().zip(&ips) {
                    loop {
                        match s.recv(&mut buf) {
                            Ok(_) => *reached.entry(*ip).or_insert(0) += 1,
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                *reached.entry(*ip).or_insert(0) += 1
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
            reached
        })
        .unwrap()
    })
}

#[test]
fn no_race_a_new_pod_under_default_deny_gets_zero_packets_in_its_first_second() {
    veilnet_test_support::require_root!();
    let _serial = serial();
    let lab = Lab::up("nr", &["--nodes", "2"]);
    for ns in ["x", "open"] {
        lab.apply(&namespace_manifest(ns));
    }
    lab.apply(&pod_manifest(
        "x",
        "client",
        "node-2",
        &[("pod", "client")],
        SERVE,
    ));
    lab.wait_pod_ip("x/client", Duration::from_secs(60));
    let client_ns = lab.pod_netns("x/client");
    lab.apply(
        &serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": "default-deny-ingress"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
        .to_string(),
    );
    eventually(Duration::from_secs(10), "the policy on node-1", || {
        lab.policy_status(1)["policiesTotal"] == 1
    });
    // New pods on node-1 get the next addresses of its /24: hammer them all from the start.
    let candidates: Vec<Ipv4Addr> = (2..40).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();

    let run = |ns: &str, name: &str| -> (usize, Duration) {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = hammer(&client_ns, candidates.clone(), stop.clone());
        std::thread::sleep(Duration::from_millis(300));
        let created = Instant::now();
        lab.apply(&pod_manifest(ns, name, "node-1", &[("pod", name)], SERVE));
        let ip: Ipv4Addr = lab
            .wait_pod_ip(&format!("{ns}/{name}"), Duration::from_secs(60))
            .parse()
            .unwrap();
        let running = created.elapsed();
        // The pod's link is up before it is Running: hammer on for well over a second after.
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let hits = h.join().unwrap();
        (hits.get(&ip).copied().unwrap_or(0), running)
    };
    // Control: without a policy, the hammer does reach a new pod (so zero below means something).
    let (open_hits, _) = run("open", "control");
    assert!(
        open_hits > 0,
        "control: the hammer never reached an unprotected new pod"
    );
    let (denied_hits, running) = run("x", "target");
    assert_eq!(
        denied_hits, 0,
        "a pod under default deny got packets in (Running after {running:?})"
    );
    eventually(
        Duration::from_secs(8),
        "deny_ingress counted the hammer",
        || {
            lab.policy_status(1)["counters"]["denyIngress"]["packets"]
                .as_u64()
                .unwrap_or(0)
                > 0
        },
    );
}

// ---- label changes, counters, flow log, explain ----

fn time_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit * 3,
            "{what}: not after {:?}",
            start.elapsed()
        );
    }
    start.elapsed()
}

#[test]
fn label_changes_take_effect_within_a_second_and_are_explained() {
    veilnet_test_support::require_root!();
    let _serial = serial();
    let lab = Lab::up("lc", &["--nodes", "2"]);
    for ns in ["x", "y"] {
        lab.apply(&namespace_manifest(ns));
    }
    lab.apply(&pod_manifest(
        "x",
        "server",
        "node-1",
        &[("pod", "server")],
        SERVE,
    ));
    lab.apply(&pod_manifest(
        "y",
        "client",
        "node-2",
        &[("pod", "client")],
        SERVE,
    ));
    let server = lab.wait_pod_ip("x/server", Duration::from_secs(60));
    lab.wait_pod_ip("y/client", Duration::from_secs(60));
    let client_ns = lab.pod_netns("y/client");
    let target = format!("{server}:80");
    let reach = || probe_in(&client_ns, &target, "tcp", "300ms") == Some(0);
    assert!(reach(), "no policy yet: the client must reach the server");

    lab.apply(
        &serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": "allow-clients"},
            "spec": {"podSelector": {"matchLabels": {"pod": "server"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}},
                                            "podSelector": {"matchLabels": {"role": "client"}}}]}]}})
        .to_string(),
    );
    let t = time_until("policy isolates the server", Duration::from_secs(1), || {
        !reach()
    });
    eprintln!("policy applied -> denied after {t:?}");

    // Both labels are needed (one peer: intersection). Namespace first, then the pod.
    lab.kubectl_ok(&["label", "namespace", "y", "team=blue"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        !reach(),
        "the namespace label alone must not open the server"
    );
    lab.kubectl_ok(&["label", "pod", "-n", "y", "client", "role=client"]);
    let t = time_until("pod label opens the server", Duration::from_secs(1), reach);
    eprintln!("pod label -> allowed after {t:?}");
    assert!(t < Duration::from_secs(1), "pod label change took {t:?}");
    lab.kubectl_ok(&["label", "namespace", "y", "team-"]);
    let t = time_until(
        "namespace label removal closes the server",
        Duration::from_secs(1),
        || !reach(),
    );
    eprintln!("namespace label removed -> denied after {t:?}");
    assert!(
        t < Duration::from_secs(1),
        "namespace label change took {t:?}"
    );
    lab.kubectl_ok(&["label", "namespace", "y", "team=blue"]);
    let t = time_until(
        "namespace label opens the server again",
        Duration::from_secs(1),
        reach,
    );
    assert!(
        t < Duration::from_secs(1),
        "namespace label change took {t:?}"
    );

    // Counters: the allow policy counted connections; the flow log has the denials.
    eventually(
        Duration::from_secs(8),
        "allow-clients counted in node-1's status",
        || {
            lab.policy_status(1)["counters"]["policies"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "allow-clients" && p["packets"].as_u64().unwrap_or(0) > 0)
        },
    );
    let denials = lab.flow_log(1);
    assert!(
        denials.iter().any(|r| r["verdict"] == "deny"
            && r["policy"] == "default deny"
            && r["src"]["pod"] == "client"
            && r["src"]["namespace"] == "y"
            && r["dst"]["pod"] == "server"
            && r["dst"]["port"] == 80
            && r["protocol"] == "TCP"),
        "{denials:#?}"
    );

    // explain, from the same compiler.
    let explain = |from: &str| {
        let out = ok(veilnet().args([
            "policy", "explain", "--lab", &lab.name, from, "x/server", "80/tcp", "--json",
        ]));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let yes = explain("y/client");
    assert_eq!(yes["allowed"], true, "{yes}");
    assert_eq!(yes["ingress"]["allowedBy"][0]["policy"], "x/allow-clients");
    lab.kubectl_ok(&["label", "pod", "-n", "y", "client", "role-"]);
    let no = explain("y/client");
    assert_eq!(no["allowed"], false, "{no}");
    assert_eq!(no["ingress"]["isolatedBy"][0], "x/allow-clients");
    let text = ok(veilnet().args([
        "policy", "explain", "--lab", &lab.name, "y/client", &server, "80",
    ]));
    assert!(
        text.contains("denied: default deny ingress (isolated by x/allow-clients)"),
        "{text}"
    );
}
