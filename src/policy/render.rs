//! The compiled model → one nft script (pure).
//!
//! The script replaces both veilnet tables in a single transaction: each table is declared
//! (creating it if absent), deleted, and declared again with its full content. `nft -f` commits
//! all of that atomically, so the kernel never runs a half-built ruleset and a change is never a
//! rule-by-rule patch. See the module docs of `policy` for the layout of chains, sets and maps.

use std::fmt::Write;
use std::net::IpAddr;

use super::addrset::AddrSet;
use super::compile::{AntiSpoofPort, CompiledPolicy, CompiledRule, Direction, PodChain, RuleMatch};
use super::logprefix::{allow_prefix, deny_prefix, spoof_prefix};

/// Name of both veilnet tables (`inet veilnet` for policy, `bridge veilnet` for anti-spoofing).
pub const TABLE: &str = "veilnet";
/// Named counter of default-deny drops, per direction.
pub const DENY_INGRESS_COUNTER: &str = "deny_ingress";
pub const DENY_EGRESS_COUNTER: &str = "deny_egress";
/// Named counter of frames dropped by anti-spoofing (bridge table).
pub const SPOOF_COUNTER: &str = "spoofed";

/// Renders the whole ruleset for `nft -f -`.
pub fn render_nft(policy: &CompiledPolicy) -> String {
    let mut out = String::with_capacity(4096 + policy.chains.len() * 256);
    let _ = writeln!(
        out,
        "# veilnet NetworkPolicy for node {:?}: {} policies, {} pod chains, {} guarded ports",
        policy.node,
        policy.policies.len(),
        policy.chains.len(),
        policy.anti_spoof.len()
    );
    render_inet(&mut out, policy);
    render_bridge(&mut out, policy);
    out
}

/// nft's name of a family-specific address match.
fn addr_key(v6: bool, dir_src: bool) -> &'static str {
    match (v6, dir_src) {
        (false, true) => "ip saddr",
        (false, false) => "ip daddr",
        (true, true) => "ip6 saddr",
        (true, false) => "ip6 daddr",
    }
}

fn chain_name(index: usize, chain: &PodChain) -> String {
    match chain.direction {
        Direction::Ingress => format!("ing_{index}"),
        Direction::Egress => format!("egr_{index}"),
    }
}

fn write_elements(out: &mut String, elements: impl Iterator<Item = String>) {
    let mut first = true;
    for e in elements {
        if first {
            out.push_str("\t\telements = { ");
            first = false;
        } else {
            out.push_str(",\n\t\t\t     ");
        }
        out.push_str(&e);
    }
    if !first {
        out.push_str(" }\n");
    }
}

fn write_set(out: &mut String, name: &str, ty: &str, interval: bool, elements: Vec<String>) {
    let _ = writeln!(out, "\tset {name} {{\n\t\ttype {ty}");
    if interval {
        out.push_str("\t\tflags interval\n");
    }
    write_elements(out, elements.into_iter());
    out.push_str("\t}\n");
}

fn addr_elements(set: &AddrSet, v6: bool) -> Vec<String> {
    if v6 {
        set.v6_elements().collect()
    } else {
        set.v4_elements().collect()
    }
}

fn node_set(policy: &CompiledPolicy, v6: bool) -> AddrSet {
    let mut s = AddrSet::new();
    for ip in &policy.node_addrs {
        if ip.is_ipv6() == v6 {
            s.push_ip(*ip);
        }
    }
    s.normalize();
    s
}

fn quote_comment(s: &str) -> String {
    // Names are DNS labels; strip anything that could break the quoting anyway.
    let clean: String = s
        .chars()
        .filter(|c| *c != '"' && *c != '\\')
        .take(120)
        .collect();
    format!("\"{clean}\"")
}

fn render_inet(out: &mut String, p: &CompiledPolicy) {
    let _ = writeln!(out, "table inet {TABLE} {{\n}}\ndelete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");

    for (id, pol) in p.policies.iter().enumerate() {
        let _ = writeln!(
            out,
            "\tcounter {} {{\n\t\tcomment {}\n\t}}",
            CompiledPolicy::counter_name(id),
            quote_comment(&pol.to_string())
        );
    }
    for c in [DENY_INGRESS_COUNTER, DENY_EGRESS_COUNTER] {
        let _ = writeln!(out, "\tcounter {c} {{\n\t}}");
    }

    for v6 in [false, true] {
        let fam = if v6 { "v6" } else { "v4" };
        let ty = if v6 { "ipv6_addr" } else { "ipv4_addr" };
        write_set(
            out,
            &format!("node_{fam}"),
            ty,
            true,
            addr_elements(&node_set(p, v6), v6),
        );
    }
    for (id, set) in p.peer_sets.iter().enumerate() {
        if set.has_v4() {
            write_set(
                out,
                &format!("peer_{id}_v4"),
                "ipv4_addr",
                true,
                addr_elements(set, false),
            );
        }
        if set.has_v6() {
            write_set(
                out,
                &format!("peer_{id}_v6"),
                "ipv6_addr",
                true,
                addr_elements(set, true),
            );
        }
    }
    for (id, ports) in p.port_sets.iter().enumerate() {
        let elements = ports
            .0
            .iter()
            .map(|r| {
                if r.first == r.last {
                    format!("{} . {}", r.protocol.nft_name(), r.first)
                } else {
                    format!("{} . {}-{}", r.protocol.nft_name(), r.first, r.last)
                }
            })
            .collect();
        write_set(
            out,
            &format!("port_{id}"),
            "inet_proto . inet_service",
            true,
            elements,
        );
    }
    for (id, tuples) in p.dest_sets.iter().enumerate() {
        for v6 in [false, true] {
            let elements: Vec<String> = tuples
                .iter()
                .filter(|t| t.ip.is_ipv6() == v6)
                .map(|t| format!("{} . {} . {}", t.ip, t.protocol.nft_name(), t.port))
                .collect();
            if elements.is_empty() {
                continue;
            }
            let (fam, ty) = if v6 {
                ("v6", "ipv6_addr")
            } else {
                ("v4", "ipv4_addr")
            };
            write_set(
                out,
                &format!("dest_{id}_{fam}"),
                &format!("{ty} . inet_proto . inet_service"),
                false,
                elements,
            );
        }
    }

    // Verdict maps: local pod IP → its chain. One lookup per packet and direction, whatever the
    // number of policies.
    for dir in [Direction::Ingress, Direction::Egress] {
        for v6 in [false, true] {
            let (fam, ty) = if v6 {
                ("v6", "ipv6_addr")
            } else {
                ("v4", "ipv4_addr")
            };
            // An IP claimed by two pods (a stale pod) maps to the first chain, as `chain_for`
            // (and so `explain`) picks it; nft refuses duplicate keys.
            let mut entries: Vec<(IpAddr, usize, String)> = Vec::new();
            for (i, chain) in p.chains.iter().enumerate() {
                if chain.direction != dir {
                    continue;
                }
                for ip in chain.ips.iter().filter(|ip| ip.is_ipv6() == v6) {
                    entries.push((*ip, i, chain_name(i, chain)));
                }
            }
            entries.sort();
            entries.dedup_by(|a, b| a.0 == b.0);
            let _ = writeln!(
                out,
                "\tmap {}_{fam} {{\n\t\ttype {ty} : verdict",
                dir.as_str()
            );
            write_elements(
                out,
                entries
                    .iter()
                    .map(|(ip, _, chain)| format!("{ip} : jump {chain}")),
            );
            out.push_str("\t}\n");
        }
    }

    for (i, chain) in p.chains.iter().enumerate() {
        render_pod_chain(out, p, i, chain);
    }

    let _ = writeln!(
        out,
        "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;"
    );
    out.push_str("\t\tct state established,related accept\n");
    out.push_str("\t\tct state invalid drop\n");
    out.push_str("\t\tip saddr @node_v4 accept\n");
    out.push_str("\t\tip6 saddr @node_v6 accept\n");
    out.push_str("\t\tip saddr vmap @egress_v4\n");
    out.push_str("\t\tip6 saddr vmap @egress_v6\n");
    out.push_str("\t\tip daddr vmap @ingress_v4\n");
    out.push_str("\t\tip6 daddr vmap @ingress_v6\n");
    out.push_str("\t}\n");
    out.push_str("}\n");
}

/// The match expressions of one rule: one per address family it needs, or one family-less.
fn rule_matches(p: &CompiledPolicy, rule: &CompiledRule, dir: Direction) -> Vec<String> {
    let peer_is_src = dir == Direction::Ingress;
    match &rule.matcher {
        RuleMatch::PeersPorts { peers, ports } => {
            let port_match = ports.map(|id| format!("meta l4proto . th dport @port_{id}"));
            let mut out = Vec::new();
            match peers {
                None => out.push(port_match.clone().unwrap_or_default()),
                Some(id) => {
                    let set = &p.peer_sets[*id];
                    for (v6, present) in [(false, set.has_v4()), (true, set.has_v6())] {
                        if !present {
                            continue;
                        }
                        let fam = if v6 { "v6" } else { "v4" };
                        let mut m = format!("{} @peer_{id}_{fam}", addr_key(v6, peer_is_src));
                        if let Some(pm) = &port_match {
                            m.push(' ');
                            m.push_str(pm);
                        }
                        out.push(m);
                    }
                }
            }
            out
        }
        RuleMatch::Destinations(id) => {
            let tuples = &p.dest_sets[*id];
            let mut out = Vec::new();
            for v6 in [false, true] {
                if tuples.iter().any(|t| t.ip.is_ipv6() == v6) {
                    let fam = if v6 { "v6" } else { "v4" };
                    out.push(format!(
                        "{} . meta l4proto . th dport @dest_{id}_{fam}",
                        addr_key(v6, false)
                    ));
                }
            }
            out
        }
    }
}

fn join(m: &str, rest: &str) -> String {
    if m.is_empty() {
        rest.to_string()
    } else {
        format!("{m} {rest}")
    }
}

fn render_pod_chain(out: &mut String, p: &CompiledPolicy, index: usize, chain: &PodChain) {
    let o = &p.options;
    let limit = format!(
        "limit rate {}/second burst {} packets log group {}",
        o.log_rate_per_second, o.log_burst, o.log_group
    );
    // Egress rules `return` so that the destination's ingress chain still runs; `accept` would
    // end the whole forward hook.
    let verdict = match chain.direction {
        Direction::Ingress => "accept",
        Direction::Egress => "return",
    };
    let _ = writeln!(out, "\tchain {} {{", chain_name(index, chain));
    let _ = writeln!(
        out,
        "\t\tcomment {}",
        quote_comment(&format!("{} {}", chain.direction, chain.pod))
    );
    for rule in &chain.rules {
        let policy = &p.policies[rule.policy];
        let prefix = allow_prefix(chain.direction, policy);
        for m in rule_matches(p, rule, chain.direction) {
            if o.log_allowed {
                let _ = writeln!(
                    out,
                    "\t\t{}",
                    join(&m, &format!("{limit} prefix \"{prefix}\""))
                );
            }
            let _ = writeln!(
                out,
                "\t\t{} comment {}",
                join(
                    &m,
                    &format!(
                        "counter name \"{}\" {verdict}",
                        CompiledPolicy::counter_name(rule.policy)
                    )
                ),
                quote_comment(&format!("{prefix}#{}", rule.rule_index))
            );
        }
    }
    let pod_prefix = deny_prefix(chain.direction, &chain.pod);
    let _ = writeln!(out, "\t\t{limit} prefix \"{pod_prefix}\"");
    let isolated: Vec<String> = chain
        .isolated_by
        .iter()
        .map(|i| p.policies[*i].to_string())
        .collect();
    let counter = match chain.direction {
        Direction::Ingress => DENY_INGRESS_COUNTER,
        Direction::Egress => DENY_EGRESS_COUNTER,
    };
    let _ = writeln!(
        out,
        "\t\tcounter name \"{counter}\" drop comment {}",
        quote_comment(&format!("default deny, isolated by {}", isolated.join(" ")))
    );
    out.push_str("\t}\n");
}

fn render_bridge(out: &mut String, p: &CompiledPolicy) {
    let o = &p.options;
    let _ = writeln!(
        out,
        "table bridge {TABLE} {{\n}}\ndelete table bridge {TABLE}"
    );
    let _ = writeln!(out, "table bridge {TABLE} {{");
    let _ = writeln!(out, "\tcounter {SPOOF_COUNTER} {{\n\t}}");
    let mut ports: Vec<(usize, &AntiSpoofPort)> = p.anti_spoof.iter().enumerate().collect();
    ports.sort_by(|a, b| a.1.host_veth.cmp(&b.1.host_veth));
    ports.dedup_by(|a, b| a.1.host_veth == b.1.host_veth);
    out.push_str("\tmap pod_ports {\n\t\ttype ifname : verdict\n");
    write_elements(
        out,
        ports
            .iter()
            .map(|(i, port)| format!("\"{}\" : goto port_{i}", port.host_veth)),
    );
    out.push_str("\t}\n");
    for (i, port) in &ports {
        let _ = writeln!(out, "\tchain port_{i} {{");
        let _ = writeln!(out, "\t\tcomment {}", quote_comment(&port.pod.to_string()));
        let mac = port
            .mac
            .map(|m| format!("ether saddr {m} "))
            .unwrap_or_default();
        let v4: Vec<String> = port
            .ips
            .iter()
            .filter(|ip| ip.is_ipv4())
            .map(|ip| ip.to_string())
            .collect();
        let mut v6: Vec<String> = port
            .ips
            .iter()
            .filter(|ip| ip.is_ipv6())
            .map(|ip| ip.to_string())
            .collect();
        if !v4.is_empty() {
            let ips = v4.join(", ");
            let _ = writeln!(out, "\t\t{mac}ether type ip ip saddr {{ {ips} }} return");
            let arp_mac = port
                .mac
                .map(|m| format!("arp saddr ether {m} "))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "\t\t{mac}ether type arp {arp_mac}arp saddr ip {{ {ips} }} return"
            );
        }
        if !v6.is_empty() {
            // Neighbour discovery uses the link-local address.
            v6.push("fe80::/10".to_string());
            let _ = writeln!(
                out,
                "\t\t{mac}ether type ip6 ip6 saddr {{ {} }} return",
                v6.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "\t\tlimit rate {}/second burst {} packets log group {} prefix \"{}\"",
            o.log_rate_per_second,
            o.log_burst,
            o.log_group,
            spoof_prefix(&port.pod)
        );
        let _ = writeln!(out, "\t\tcounter name \"{SPOOF_COUNTER}\" drop");
        out.push_str("\t}\n");
    }
    out.push_str(
        "\tchain prerouting {\n\t\ttype filter hook prerouting priority filter; policy accept;\n",
    );
    out.push_str("\t\tiifname vmap @pod_ports\n");
    if o.drop_unknown_pod_ports {
        let _ = writeln!(
            out,
            "\t\tiifname \"veil*\" counter name \"{SPOOF_COUNTER}\" drop"
        );
    }
    out.push_str("\t}\n}\n");
}
