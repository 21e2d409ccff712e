//! Entry points for fuzzers: one function per input surface that cluster data, a pod, a local
//! client or the underlay can reach. Each takes arbitrary bytes and panics only when one of
//! veilnet's own invariants breaks (never on bad input, which must come back as an error). Each
//! returns whether its first parser accepted the input, so that a seed that no longer parses
//! (a renamed field) is noticed instead of silently fuzzing nothing.
//!
//! The coverage-guided targets in `fuzz/` (cargo-fuzz, `scripts/fuzz.sh`) call these, and
//! `tests/fuzz_corpus.rs` replays the committed corpus through them on stable Rust in
//! `./scripts/test.sh`, so every input a fuzzer ever broke veilnet with stays a regression test.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::agent::config::{AgentArgs, AgentConfig};
use crate::agent::plan::{plan_node, PlanInput};
use crate::agent::snapshot::{ClusterSnapshot, SelfInfo};
use crate::agent::underlay::UnderlayDevice;
use crate::cluster::podcidr::AllocationRecord;
use crate::model::encryption::Path;
use crate::policy::{self, ClusterState, NamedPort, NamespaceInfo, PodInfo, Protocol};
use crate::wg::keys::PublicKey;

/// UDP datagrams into the WireGuard port (see `wg::fuzzing`).
pub fn wg_datagrams(data: &[u8]) -> bool {
    crate::wg::fuzzing::datagrams(data);
    true
}

/// DNS messages as pods send them and the flow log reads them: the bytes as a message, and as
/// the IPv4 or IPv6 packet NFLOG hands over, whose UDP data is read as one. Never a panic, and a
/// name is never longer than 255 bytes written as `\DDD` escapes. True if a message was read
/// (from the bytes, or from the packet's UDP data).
pub fn dns_messages(data: &[u8]) -> bool {
    use crate::dns::message::Message;
    let check = |m: &Message| assert!(m.question.name.len() <= 4 * 255, "{}", m.question.name);
    let parsed = Message::parse(data);
    if let Ok(m) = &parsed {
        check(m);
    }
    let mut read = parsed.is_ok();
    for family in [2u8, 10] {
        let packet = crate::netfilter::nflog::LoggedPacket {
            family,
            payload: data.to_vec(),
            ..Default::default()
        };
        if let Some(d) = policy::flow::parse_flow(&packet).and_then(|flow| flow.udp_data(&packet)) {
            if let Ok(m) = Message::parse(d) {
                check(&m);
                read = true;
            }
        }
    }
    read
}

/// What `veilnet observe` reads: flow lines from the agents' endpoints and files (whatever an
/// agent, or anything that answers in its place, sends), the table it renders from them, and the
/// first lines again as the command line's filter values (`--namespace`, `--pod`, `--verdict`,
/// `--policy`, `--node`, then `--since`). Never a panic: a line is a flow line or is counted as
/// skipped, merged lines are oldest first, and a refused filter names its flag. True if a flow
/// line was read.
pub fn flow_lines(data: &[u8]) -> bool {
    use crate::observe::filter::{parse_since, Filter, FilterArgs};
    use crate::observe::{merge, parse_lines, row};
    let text = String::from_utf8_lossy(data);
    let mut skipped = 0;
    let lines = parse_lines(&text, &mut skipped);
    let non_empty = text.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(
        lines.len() + skipped,
        non_empty,
        "every line read or skipped"
    );
    for r in &lines {
        let _ = row(r);
    }
    let read = !lines.is_empty();
    let mut values = text.lines();
    let args = FilterArgs {
        namespace: values.next(),
        pod: values.next(),
        verdict: values.next(),
        policy: values.next(),
        encrypted: None,
        node: values.next(),
    };
    match Filter::parse(args) {
        Ok(filter) => {
            let kept = merge(vec![lines], &filter);
            assert!(
                kept.windows(2).all(|w| w[0].time <= w[1].time),
                "oldest first"
            );
        }
        Err(e) => assert!(e.to_string().starts_with("--"), "{e}"),
    }
    if let Some(since) = values.next() {
        let now = jiff::Timestamp::UNIX_EPOCH;
        if let Err(e) = parse_since(since, now) {
            assert!(e.to_string().starts_with("--since"), "{e}");
        }
    }
    read
}

/// Node objects (a JSON array of them, annotations and labels as any writer of Nodes may set
/// them) through the snapshot and the node planner. The planner may refuse this node's own
/// settings with an error; it must not panic, and every CIDR it routes to a peer must be one the
/// cluster (not the peer) assigned to that peer.
pub fn node_objects(data: &[u8]) -> bool {
    let Ok(nodes) = serde_json::from_slice::<Vec<Node>>(data) else {
        return false;
    };
    let nodes: Vec<Arc<Node>> = nodes.into_iter().map(Arc::new).collect();
    let cluster = ClusterSnapshot::take("n1", &nodes, &AllocationRecord::default());
    let (cfg, me) = planned_node();
    let Ok(plan) = plan_node(&PlanInput {
        cfg,
        me,
        cluster: &cluster,
        wg_key: &PublicKey::from([1u8; 32]),
        incumbents: &BTreeMap::new(),
        key_bindings: &BTreeMap::new(),
    }) else {
        return true;
    };
    // Every WireGuard allowed IP (what the datapath routes to and accepts from a peer) is in
    // the peer's cluster-assigned pod CIDRs or is one of its recorded node addresses.
    for path in &plan.paths {
        let Path::Wireguard { public_key, .. } = &path.path else {
            continue;
        };
        let record = cluster
            .peers
            .iter()
            .find(|p| p.name == path.node)
            .expect("a path leads to a known peer");
        let wg = plan
            .wg_peers
            .iter()
            .find(|c| c.public_key.as_bytes() == public_key)
            .expect("a WireGuard path has a datapath peer");
        for net in &wg.allowed_ips {
            let owned = record.pod_cidrs.iter().any(|c| c.contains(net))
                || (net.prefix_len() == net.max_prefix_len()
                    && record.node_addresses.contains(&net.addr()));
            assert!(
                owned,
                "{net} routed to {}, which the cluster gave {:?} and {:?}",
                path.node, record.pod_cidrs, record.node_addresses
            );
        }
    }
    true
}

/// The agent settings and self-knowledge of node `n1`, the same for every input (built once).
fn planned_node() -> &'static (AgentConfig, SelfInfo) {
    static NODE: OnceLock<(AgentConfig, SelfInfo)> = OnceLock::new();
    NODE.get_or_init(|| {
        let cfg = AgentConfig::resolve(&AgentArgs {
            node_name: Some("n1".into()),
            ..Default::default()
        })
        .expect("the default agent configuration resolves");
        let me = SelfInfo::new(
            "n1",
            UnderlayDevice {
                ip: "172.30.0.11".parse().expect("literal"),
                dev: "eth0".into(),
                mtu: 1500,
            },
            vec!["10.244.1.0/24".parse().expect("literal")],
            false,
        );
        (cfg, me)
    })
}

/// A line on the datapath's control socket: a request decodes, or is refused; a decoded one
/// encodes back to the same request.
pub fn datapath_request(data: &[u8]) -> bool {
    use crate::datapath::protocol::{encode, Request};
    let Ok(request) = serde_json::from_slice::<Request>(data) else {
        return false;
    };
    let line = encode(&request).expect("a decoded request encodes");
    let again: Request = serde_json::from_slice(&line).expect("an encoded request decodes");
    assert_eq!(again, request);
    true
}

/// A line on the agent's admission socket (what the CNI plugin sends), both directions.
pub fn admission_line(data: &[u8]) -> bool {
    use veilnet_cni::agent_protocol::{decode_line, encode_line, Request, Response};
    let mut accepted = false;
    if let Ok(request) = decode_line::<Request>(data) {
        assert_eq!(
            decode_line::<Request>(&encode_line(&request)).ok(),
            Some(request)
        );
        accepted = true;
    }
    if let Ok(response) = decode_line::<Response>(data) {
        assert_eq!(
            decode_line::<Response>(&encode_line(&response)).ok(),
            Some(response)
        );
        accepted = true;
    }
    accepted
}

/// The CNI plugin's inputs: the network configuration on stdin, and (the same bytes read as
/// `KEY=VALUE` lines) its environment.
pub fn cni_input(data: &[u8]) -> bool {
    let config = veilnet_cni::config::parse(data).is_ok();
    let text = String::from_utf8_lossy(data);
    let env: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let env = veilnet_cni::env::parse(|k| env.get(k).map(|v| v.to_string())).is_ok();
    config || env
}

/// Netlink buffers as the kernel would hand them over: NFLOG packets (and the flows parsed from
/// them), a conntrack dump, an nftables counter dump.
pub fn netlink_dumps(data: &[u8]) -> bool {
    let packets = crate::netfilter::nflog::parse_messages(data);
    let mut flows = 0;
    for packet in &packets {
        flows += usize::from(policy::flow::parse_flow(packet).is_some());
        let _ = packet.ether_addrs();
    }
    let _ = crate::netfilter::conntrack::parse_dump(data);
    let _ = crate::netfilter::counters::parse_dump(data, policy::TABLE);
    flows > 0
}

/// NetworkPolicy objects (a JSON array) compiled for node `n1` of a small cluster and rendered:
/// returns the nft script, which `tests/fuzz_corpus.rs` also has `nft -c` check.
pub fn network_policies(data: &[u8]) -> Option<String> {
    let policies = serde_json::from_slice::<Vec<NetworkPolicy>>(data).ok()?;
    let state = small_cluster(policies);
    let node_addrs: Vec<IpAddr> = vec!["172.30.0.11".parse().expect("literal")];
    let compiled = policy::compile(&state, "n1", &node_addrs);
    Some(policy::render_nft(&compiled))
}

/// Two namespaces with two pods each, one pair on `n1`, with labels and named ports for the
/// policies to select.
fn small_cluster(policies: Vec<NetworkPolicy>) -> ClusterState {
    let mut pods = Vec::new();
    for (n, ns) in ["default", "other"].into_iter().enumerate() {
        for (m, name) in ["a", "b"].into_iter().enumerate() {
            pods.push(PodInfo {
                namespace: ns.into(),
                name: name.into(),
                labels: [("app".to_string(), name.to_string())].into(),
                ips: vec![IpAddr::from([10, 244, 1 + m as u8, 10 + n as u8])],
                node: format!("n{}", m + 1),
                named_ports: vec![NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                }],
                host_network: false,
                host_veth: Some(format!("veil{n}{m}")),
                mac: Some(policy::MacAddr([0x0a, 0x58, 0, 0, n as u8, m as u8])),
            });
        }
    }
    ClusterState {
        pods,
        namespaces: ["default", "other"]
            .into_iter()
            .map(|ns| NamespaceInfo {
                name: ns.into(),
                labels: [(policy::NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into(),
            })
            .collect(),
        policies,
    }
}
