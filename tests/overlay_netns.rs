//! Root tests of the overlay applier against real kernels in throwaway namespaces.
//!
//! Each test builds its own mini cluster: an "underlay" namespace with a bridge, two "node"
//! namespaces wired to it by veths, and one "pod" namespace per node on the node's pod bridge.
//! The agent code runs inside the node namespaces exactly as in production: a netlink
//! connection opened on a thread that entered the namespace. Everything is removed on drop,
//! also when an assertion fails.

use std::net::IpAddr;
use std::process::Command;

use veilnet::kernel::mtu::{underlay_for, Underlay};
use veilnet::kernel::{
    apply, sysctl, ApplyError, ApplyReport, NetlinkKernel, ObservedLink, ObservedRoute,
    OverlayKernel, VEILNET_ROUTE_PROTOCOL,
};
use veilnet::model::annotations;
use veilnet::model::mac::derive_vtep_mac;
use veilnet::model::overlay::{plan_overlay, DesiredOverlay, OverlayInput, SelfNode, VxlanConfig};
use veilnet::model::peer::{NodeFacts, PeerRecord};
use veilnet::netns;
use veilnet_test_support::{require_root, Netns};

/// Runs `ip` (or another tool) and panics with its stderr on failure.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The namespaces of one test; deleted (with anything left running in them) on drop.
struct Lab {
    underlay: Netns,
    nodes: [Netns; 2],
    pods: [Netns; 2],
}

const UNDERLAY_IPS: [&str; 2] = ["192.168.77.1", "192.168.77.2"];
const POD_CIDRS: [&str; 2] = ["10.244.1.0/24", "10.244.2.0/24"];
const POD_IPS: [&str; 2] = ["10.244.1.2", "10.244.2.2"];
const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];

impl Lab {
    fn new(tag: &str) -> Lab {
        let ns = |part: &str| Netns::new("veilov", &format!("{tag}-{part}"));
        let lab = Lab {
            underlay: ns("u"),
            nodes: [ns("a"), ns("b")],
            pods: [ns("pa"), ns("pb")],
        };
        let u = lab.underlay.name();
        sh(&["ip", "-n", u, "link", "add", "ubr", "type", "bridge"]);
        sh(&["ip", "-n", u, "link", "set", "ubr", "up"]);
        for (i, node) in lab.nodes.iter().enumerate() {
            let node = node.name();
            let port = format!("u{i}");
            sh(&[
                "ip", "-n", u, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", node,
            ]);
            sh(&["ip", "-n", u, "link", "set", &port, "master", "ubr", "up"]);
            let addr = format!("{}/24", UNDERLAY_IPS[i]);
            sh(&["ip", "-n", node, "addr", "add", &addr, "dev", "eth0"]);
            sh(&["ip", "-n", node, "link", "set", "eth0", "up"]);
            // The pod's veth; its node end joins the pod bridge once the agent created it.
            let pod = lab.pods[i].name();
            sh(&[
                "ip", "-n", node, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0",
                "netns", pod,
            ]);
        }
        lab
    }

    /// Plugs node `i`'s pod into its bridge, the way a CNI plugin would.
    fn attach_pod(&self, i: usize, desired: &DesiredOverlay) {
        let node = self.nodes[i].name();
        let pod = self.pods[i].name();
        let mtu = desired.pod_mtu.to_string();
        let gw = veilnet::model::overlay::gateway_address(&POD_CIDRS[i].parse().unwrap());
        sh(&["ip", "-n", node, "link", "set", "vpod", "mtu", &mtu]);
        sh(&[
            "ip",
            "-n",
            node,
            "link",
            "set",
            "vpod",
            "master",
            &desired.bridge.name,
            "up",
        ]);
        sh(&["ip", "-n", pod, "link", "set", "eth0", "mtu", &mtu]);
        sh(&[
            "ip",
            "-n",
            pod,
            "addr",
            "add",
            &format!("{}/24", POD_IPS[i]),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", pod, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            pod,
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
        ]);
    }

    /// True if pod `from` gets an answer from pod `to` with `size`-byte payloads, DF set.
    fn ping(&self, from: usize, to: usize, size: u32) -> bool {
        sh_ok(&[
            "ip",
            "netns",
            "exec",
            &self.pods[from],
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &size.to_string(),
            POD_IPS[to],
        ])
    }
}

/// Runs an async closure over a fresh netlink connection inside `ns`, on a current-thread
/// runtime built on the namespace's own thread.
fn in_ns<T, F, Fut>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(NetlinkKernel) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    netns::run_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move { f(NetlinkKernel::connect().unwrap()).await })
    })
    .unwrap()
}

fn apply_in(ns: &str, desired: &DesiredOverlay) -> Result<ApplyReport, ApplyError> {
    let desired = desired.clone();
    in_ns(
        ns,
        move |mut k| async move { apply(&mut k, &desired).await },
    )
}

fn links_in(ns: &str) -> Vec<ObservedLink> {
    in_ns(ns, |mut k| async move { k.dump_links().await.unwrap() })
}

fn routes_in(ns: &str) -> Vec<ObservedRoute> {
    in_ns(ns, |mut k| async move { k.dump_routes().await.unwrap() })
}

fn underlay_in(ns: &str, dst: &str) -> Underlay {
    let dst: IpAddr = dst.parse().unwrap();
    in_ns(
        ns,
        move |k| async move { underlay_for(&k, dst).await.unwrap() },
    )
}

fn index_of(links: &[ObservedLink], name: &str) -> u32 {
    links
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no link {name}"))
        .index
}

/// Node `i`'s desired overlay, with `peers` (indexes) as the cluster's other nodes.
fn desired_for(lab: &Lab, i: usize, peers: &[usize]) -> DesiredOverlay {
    let underlay = underlay_in(&lab.nodes[i], UNDERLAY_IPS[1 - i]);
    assert_eq!(underlay.dev, "eth0");
    let input = OverlayInput {
        incumbents: Default::default(),
        node: SelfNode {
            name: NODE_NAMES[i].into(),
            underlay_ip: underlay.source.unwrap(),
            underlay_dev: underlay.dev.clone(),
            pod_cidrs: vec![POD_CIDRS[i].parse().unwrap()],
            vtep_mac: None,
        },
        vxlan: VxlanConfig::default(),
        underlay_mtu: underlay.mtu(),
        peers: peers
            .iter()
            .map(|&p| {
                let anns = [
                    (annotations::UNDERLAY_IP, UNDERLAY_IPS[p].to_string()),
                    (
                        annotations::VTEP_MAC,
                        derive_vtep_mac(NODE_NAMES[p]).to_string(),
                    ),
                    (annotations::VXLAN_VNI, "1".to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                PeerRecord::parse(
                    NODE_NAMES[p],
                    &anns,
                    &Default::default(),
                    NodeFacts {
                        pod_cidrs: vec![POD_CIDRS[p].parse().unwrap()],
                        node_addresses: vec![UNDERLAY_IPS[p].parse().unwrap()],
                        created: None,
                    },
                )
            })
            .collect(),
    };
    let desired = plan_overlay(&input).unwrap();
    assert!(desired.rejected.is_empty(), "{:?}", desired.rejected);
    desired
}

/// Two nodes programmed for each other, forwarding on, pods attached.
fn converge(lab: &Lab) -> [DesiredOverlay; 2] {
    let desired = [desired_for(lab, 0, &[1]), desired_for(lab, 1, &[0])];
    for (i, (node, want)) in lab.nodes.iter().zip(&desired).enumerate() {
        let report = apply_in(node, want).unwrap();
        assert_eq!(report.writes(), 7, "{:?}", report.ops);
        sysctl::enable_forwarding(Some(node), false).unwrap();
        lab.attach_pod(i, want);
    }
    desired
}

#[test]
fn pods_talk_across_vxlan_and_reapply_is_a_no_op() {
    require_root!();
    let host_forwarding = sysctl::read(None, sysctl::IPV4_FORWARD).unwrap();
    let lab = Lab::new("ping");
    let desired = converge(&lab);
    // The sysctl went to the node namespace only.
    assert_eq!(
        sysctl::read(Some(&lab.nodes[0]), sysctl::IPV4_FORWARD).unwrap(),
        "1"
    );
    assert_eq!(
        sysctl::read(None, sysctl::IPV4_FORWARD).unwrap(),
        host_forwarding
    );

    assert_eq!(desired[0].pod_mtu, 1450);
    assert!(lab.ping(0, 1, 56), "pod a → pod b");
    assert!(lab.ping(1, 0, 56), "pod b → pod a");
    // A full-size packet with DF fits: the pod MTU accounts for the VXLAN overhead.
    assert!(lab.ping(0, 1, desired[0].pod_mtu - 28), "full-MTU ping");
    assert!(
        !lab.ping(0, 1, desired[0].pod_mtu - 27),
        "oversize DF ping must fail"
    );

    // What the kernel holds is what the planner said, in the kernel's own words.
    let vx = &desired[0].vxlan.link.name;
    let routes = sh(&["ip", "-n", &lab.nodes[0], "route", "show", "dev", vx]);
    assert!(routes.contains("10.244.2.0/24 via 10.244.2.0"), "{routes}");
    assert!(routes.contains("onlink"), "{routes}");
    let mac_b = derive_vtep_mac("node-b").to_string();
    let neigh = sh(&["ip", "-n", &lab.nodes[0], "neigh", "show", "dev", vx]);
    assert!(
        neigh.contains(&format!("10.244.2.0 lladdr {mac_b} PERMANENT")),
        "{neigh}"
    );
    let fdb = sh(&["bridge", "-n", &lab.nodes[0], "fdb", "show", "dev", vx]);
    assert!(
        fdb.contains(&format!("{mac_b} dst 192.168.77.2 self permanent")),
        "{fdb}"
    );
    let details = sh(&["ip", "-n", &lab.nodes[0], "-d", "link", "show", vx]);
    assert!(details.contains("vxlan id 1"), "{details}");
    assert!(details.contains("dstport 8472"), "{details}");
    assert!(details.contains("nolearning"), "{details}");

    // Re-applying (as after an agent restart) writes nothing and keeps every ifindex.
    for (node, want) in lab.nodes.iter().zip(&desired) {
        let before = links_in(node);
        let report = apply_in(node, want).unwrap();
        assert!(report.ops.is_empty(), "{:?}", report.ops);
        let after = links_in(node);
        for name in ["veilbr0", "veilvx1", "eth0"] {
            assert_eq!(index_of(&before, name), index_of(&after, name), "{name}");
        }
    }
    assert!(lab.ping(0, 1, 56));
}

#[test]
fn removing_a_peer_removes_only_its_entries() {
    require_root!();
    let lab = Lab::new("rm");
    let desired = converge(&lab);
    let a = lab.nodes[0].name();
    assert!(lab.ping(0, 1, 56));

    // Things that are not ours: a foreign link with a route, and an admin's route on our bridge.
    sh(&[
        "ip",
        "-n",
        a,
        "link",
        "add",
        "veiltestd",
        "type",
        "veth",
        "peer",
        "name",
        "veiltestp",
    ]);
    sh(&["ip", "-n", a, "link", "set", "veiltestd", "up"]);
    sh(&["ip", "-n", a, "link", "set", "veiltestp", "up"]);
    sh(&[
        "ip",
        "-n",
        a,
        "route",
        "add",
        "203.0.113.0/24",
        "dev",
        "veiltestd",
    ]);
    sh(&[
        "ip",
        "-n",
        a,
        "route",
        "add",
        "198.51.100.0/24",
        "dev",
        "veilbr0",
    ]);
    let links_before = links_in(a);

    let alone = desired_for(&lab, 0, &[]);
    let report = apply_in(a, &alone).unwrap();
    let ops: Vec<String> = report.ops.iter().map(ToString::to_string).collect();
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert!(ops[0].starts_with("del route 10.244.2.0/24"), "{ops:?}");
    assert!(ops[1].starts_with("del neigh 10.244.2.0"), "{ops:?}");
    assert!(ops[2].starts_with("del fdb"), "{ops:?}");

    let vx = desired[0].vxlan.link.name.as_str();
    assert_eq!(
        sh(&["ip", "-n", a, "route", "show", "10.244.2.0/24"]).trim(),
        ""
    );
    assert!(!sh(&["ip", "-n", a, "neigh", "show", "dev", vx]).contains("10.244.2.0"));
    let mac_b = derive_vtep_mac("node-b").to_string();
    assert!(!sh(&["bridge", "-n", a, "fdb", "show", "dev", vx]).contains(&mac_b));
    assert!(!lab.ping(0, 1, 56), "no route to node b's pods any more");

    // Nothing else changed.
    let links_after = links_in(a);
    for name in ["veilbr0", "veilvx1", "eth0", "veiltestd", "vpod"] {
        assert_eq!(
            index_of(&links_before, name),
            index_of(&links_after, name),
            "{name}"
        );
    }
    let routes = routes_in(a);
    let has = |dst: &str| routes.iter().any(|r| r.dst.to_string() == dst);
    assert!(has("203.0.113.0/24") && has("198.51.100.0/24") && has("10.244.1.0/24"));
    assert!(routes
        .iter()
        .all(|r| r.protocol != VEILNET_ROUTE_PROTOCOL || r.dst.to_string() != "10.244.2.0/24"));
    assert!(apply_in(a, &alone).unwrap().ops.is_empty());

    // And the peer comes back with exactly its three entries.
    let report = apply_in(a, &desired[0]).unwrap();
    assert_eq!(report.writes(), 3, "{:?}", report.ops);
    assert!(lab.ping(0, 1, 56));
}

#[test]
fn drift_is_repaired_in_place_and_incompatible_vxlan_is_replaced() {
    require_root!();
    let lab = Lab::new("drift");
    let desired = converge(&lab);
    let a = lab.nodes[0].name();
    let before = links_in(a);

    // Someone lowers the MTU, downs the VXLAN device and deletes our route.
    sh(&["ip", "-n", a, "route", "del", "10.244.2.0/24"]);
    sh(&["ip", "-n", a, "link", "set", "veilvx1", "mtu", "1300"]);
    sh(&["ip", "-n", a, "link", "set", "veilvx1", "down"]);
    let report = apply_in(a, &desired[0]).unwrap();
    let ops: Vec<String> = report.ops.iter().map(ToString::to_string).collect();
    assert_eq!(
        ops,
        [
            "set link veilvx1 mtu 1450 up".to_string(),
            // Taking a device down flushes even its permanent neighbours (FDB entries survive).
            format!(
                "replace neigh 10.244.2.0 lladdr {} dev veilvx1",
                derive_vtep_mac("node-b")
            ),
            "replace route 10.244.2.0/24 via 10.244.2.0 dev veilvx1 onlink src 192.168.77.1"
                .to_string(),
        ]
    );
    assert_eq!(
        index_of(&before, "veilvx1"),
        index_of(&links_in(a), "veilvx1")
    );
    assert!(lab.ping(0, 1, 56));

    // A changed VTEP MAC is restored in place, without recreating the device.
    sh(&[
        "ip",
        "-n",
        a,
        "link",
        "set",
        "veilvx1",
        "address",
        "02:12:34:56:78:9a",
    ]);
    let report = apply_in(a, &desired[0]).unwrap();
    let ops: Vec<String> = report.ops.iter().map(ToString::to_string).collect();
    assert_eq!(
        ops,
        [
            format!("set link veilvx1 address {}", desired[0].vxlan.link.mac),
            // A MAC change flushes the device's neighbours, so they are written again.
            format!(
                "replace neigh 10.244.2.0 lladdr {} dev veilvx1",
                derive_vtep_mac("node-b")
            ),
        ]
    );
    assert_eq!(
        index_of(&before, "veilvx1"),
        index_of(&links_in(a), "veilvx1")
    );
    assert!(lab.ping(0, 1, 56));

    // A different VNI cannot be changed in place: the device is replaced, then fully
    // reprogrammed, and a further run is quiet again.
    let mut other_vni = desired[0].clone();
    other_vni.vxlan.vni = 2;
    let report = apply_in(a, &other_vni).unwrap();
    assert_eq!(report.recreated_links, vec!["veilvx1".to_string()]);
    assert_ne!(
        index_of(&before, "veilvx1"),
        index_of(&links_in(a), "veilvx1")
    );
    let details = sh(&["ip", "-n", a, "-d", "link", "show", "veilvx1"]);
    assert!(details.contains("vxlan id 2"), "{details}");
    assert!(apply_in(a, &other_vni).unwrap().ops.is_empty());
    // Back to the real VNI so the pods can talk again.
    apply_in(a, &desired[0]).unwrap();
    assert!(lab.ping(0, 1, 56));
}

#[test]
fn underlay_mtu_honours_route_metric_and_connect_in_works() {
    require_root!();
    let lab = Lab::new("mtu");
    let a = lab.nodes[0].name().to_string();
    sh(&["ip", "-n", &a, "link", "set", "eth0", "mtu", "1400"]);
    sh(&[
        "ip",
        "-n",
        &a,
        "route",
        "add",
        "10.99.0.0/16",
        "via",
        "192.168.77.2",
        "mtu",
        "1300",
    ]);

    let direct = underlay_in(&a, "192.168.77.2");
    assert_eq!(direct.dev, "eth0");
    assert_eq!(direct.device_mtu, 1400);
    assert_eq!(direct.route_mtu, None);
    assert_eq!(direct.mtu(), 1400);
    assert_eq!(direct.source, Some("192.168.77.1".parse().unwrap()));

    let via_metric = underlay_in(&a, "10.99.3.4");
    assert_eq!(via_metric.route_mtu, Some(1300));
    assert_eq!(via_metric.mtu(), 1300);

    // connect_in from an ordinary multi-threaded runtime outside the namespace.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let seen = rt.block_on(async {
        let mut k = NetlinkKernel::connect_in(&a).unwrap();
        let unreachable = underlay_for(&k, "172.31.0.1".parse().unwrap()).await;
        (k.dump_links().await.unwrap(), unreachable)
    });
    let names: Vec<&str> = seen.0.iter().map(|l| l.name.as_str()).collect();
    assert!(
        names.contains(&"eth0") && names.contains(&"vpod"),
        "{names:?}"
    );
    assert!(
        matches!(seen.1, Err(veilnet::kernel::KernelError::NoRoute { .. })),
        "{:?}",
        seen.1
    );
}

/// The wire table follows a peer change with element updates only, and falls back to a whole
/// load when the kernel's sets are not what was loaded (someone edited them).
#[test]
fn wire_table_peer_changes_are_element_updates_and_edits_fall_back_to_a_whole_load() {
    use std::collections::BTreeSet;
    use veilnet::kernel::wire::{self, WireRules};
    require_root!();
    let ns = Netns::new("veilov", "wire");
    let rules = |nodes: &[&str]| WireRules {
        underlay_dev: "eth0".into(),
        underlay_ip: "192.168.77.1".parse().unwrap(),
        wg_dev: "veilwg0".into(),
        vxlan_port: 8472,
        wg_port: 51820,
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        strict: false,
        vxlan_peers: Vec::new(),
        peer_nodes: nodes
            .iter()
            .map(|n| n.parse().unwrap())
            .collect::<BTreeSet<IpAddr>>(),
        agent_ports: vec![9892],
        agent_conns_per_source: 8,
        masquerade: None,
    };
    let load = |previous: Option<WireRules>, new: WireRules| {
        netns::run_in(ns.name(), move || wire::load(previous.as_ref(), &new))
            .unwrap()
            .unwrap()
    };
    let nft = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", ns.name(), "nft"];
        all.extend_from_slice(args);
        sh(&all)
    };
    let set = || {
        let out = nft(&["-j", "list", "set", "inet", wire::TABLE, "peer_nodes"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut elems: Vec<String> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o["set"]["elem"].as_array())
            .flatten()
            .map(|e| e.as_str().unwrap().to_string())
            .collect();
        elems.sort();
        elems
    };
    let handle_of_first_rule = || {
        let out = nft(&["-a", "list", "chain", "inet", wire::TABLE, "forward"]);
        out.lines()
            .find_map(|l| l.split("# handle ").nth(1).map(str::to_string))
            .unwrap()
    };
    let a = rules(&["192.168.77.2", "192.168.77.3"]);
    assert!(!load(None, a.clone()));
    assert_eq!(set(), ["192.168.77.2", "192.168.77.3"]);
    let handle = handle_of_first_rule();
    // One node leaves and another joins: only elements move, the rules stay (same handles).
    let b = rules(&["192.168.77.3", "192.168.77.4"]);
    assert!(wire::render_element_changes(&a, &b).is_some());
    assert!(!load(Some(a.clone()), b.clone()));
    assert_eq!(set(), ["192.168.77.3", "192.168.77.4"]);
    assert_eq!(handle_of_first_rule(), handle, "the rules were reloaded");
    // Someone deletes an element by hand; the next change deletes it too, the kernel refuses,
    // and the whole table is loaded: the set ends as planned.
    nft(&[
        "delete",
        "element",
        "inet",
        wire::TABLE,
        "peer_nodes",
        "{ 192.168.77.4 }",
    ]);
    let c = rules(&["192.168.77.3"]);
    assert!(!load(Some(b), c.clone()));
    assert_eq!(set(), ["192.168.77.3"]);
    // Anything but the peers changed: a whole load (the strict rules appear).
    let mut strict = c.clone();
    strict.strict = true;
    assert!(wire::render_element_changes(&c, &strict).is_none());
    load(Some(c), strict);
    let chain = nft(&["list", "chain", "inet", wire::TABLE, "output"]);
    assert!(chain.contains("plaintext_vxlan"), "{chain}");
}
