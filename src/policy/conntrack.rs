//! Strict mode (`policyStrictMode`): after a ruleset change, the connections the new policy would
//! not admit any more are cut by deleting their conntrack entries, so that their next packet is
//! `ct state new` again and meets the pod chains (and their default deny) like a new connection.
//!
//! Two parts:
//! - [`connections_to_cut`] (pure): which entries of a conntrack dump the compiled policy of this
//!   node denies, each evaluated as a new connection with [`CompiledPolicy::decide`], the
//!   evaluator `explain` uses — egress of the source if it is a local pod, ingress of the
//!   destination if it is one.
//! - [`cut`]: dump and delete over ctnetlink ([`crate::netfilter::conntrack`]).
//!
//! What is evaluated is what the forward hook saw: the original source and port, and the
//! destination after DNAT (the reply tuple's source), so a connection to a Service is judged by
//! the backend pod it reached. Entries from the node's own addresses are never cut (the ruleset
//! accepts them before any policy), nor entries to them (they take the input path, which veilnet
//! does not filter). Only TCP, UDP and SCTP entries are evaluated: policies match ports, and ICMP
//! entries expire within seconds.

use std::net::IpAddr;

use super::compile::{CompiledPolicy, Direction};
use super::explain::Decision;
use super::model::Protocol;
use crate::netfilter::conntrack::{ConntrackSocket, CtEntry};
use crate::netfilter::Result;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

fn protocol_of(proto: u8) -> Option<Protocol> {
    match proto {
        IPPROTO_TCP => Some(Protocol::Tcp),
        IPPROTO_UDP => Some(Protocol::Udp),
        IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Would the compiled policy of this node refuse `entry` as a new connection? (Pure.)
pub fn denies(model: &CompiledPolicy, entry: &CtEntry) -> bool {
    let t = entry.forwarded();
    let Some(protocol) = protocol_of(t.proto) else {
        return false;
    };
    if model.node_addrs.contains(&t.src) || model.node_addrs.contains(&t.dst) {
        return false;
    }
    let egress = model.decide(Direction::Egress, t.src, t.dst, protocol, t.dst_port);
    if matches!(egress, Decision::Denied { .. }) {
        return true;
    }
    let ingress = model.decide(Direction::Ingress, t.dst, t.src, protocol, t.dst_port);
    matches!(ingress, Decision::Denied { .. })
}

/// The entries of a dump that the compiled policy of this node denies (pure). Entries that
/// involve no local pod are never denied: the verdict maps, and so `decide`, know only local pods.
pub fn connections_to_cut(model: &CompiledPolicy, entries: &[CtEntry]) -> Vec<CtEntry> {
    entries
        .iter()
        .filter(|e| denies(model, e))
        .copied()
        .collect()
}

/// What [`cut`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Entries in the dump.
    pub examined: usize,
    /// Entries the policy denies.
    pub denied: usize,
    /// Of those, deleted now (the others were gone already or could not be deleted).
    pub cut: usize,
    pub failed: usize,
}

/// Dumps, keeps what `model` denies ([`denies`], as [`connections_to_cut`] does), and deletes
/// it once the dump is over.
pub fn cut(socket: &mut ConntrackSocket, model: &CompiledPolicy) -> Result<CutReport> {
    delete_matching(socket, |e| denies(model, e))
}

/// Deletes every entry with one of `ips` at either end, in either direction: run when a new
/// pod's address is admitted, so that no flow recorded before that pod's chains existed (packets
/// held for it in the neighbour queue, or an earlier pod's connection at the same address) passes
/// as `established`. `denied` counts the matching entries.
pub fn forget_addresses(socket: &mut ConntrackSocket, ips: &[IpAddr]) -> Result<CutReport> {
    delete_matching(socket, |e| touches(e, ips))
}

/// Whether `entry` has one of `ips` as a source or destination of either tuple.
pub fn touches(entry: &CtEntry, ips: &[IpAddr]) -> bool {
    std::iter::once(&entry.orig)
        .chain(entry.reply.as_ref())
        .any(|t| ips.contains(&t.src) || ips.contains(&t.dst))
}

fn delete_matching(
    socket: &mut ConntrackSocket,
    mut matches: impl FnMut(&CtEntry) -> bool,
) -> Result<CutReport> {
    let mut denied = Vec::new();
    let examined = socket.dump_each(|e| {
        if matches(&e) {
            denied.push(e);
        }
    })?;
    let mut report = CutReport {
        examined,
        denied: denied.len(),
        ..Default::default()
    };
    for e in &denied {
        match socket.delete(e) {
            Ok(true) => report.cut += 1,
            Ok(false) => {}
            Err(err) => {
                report.failed += 1;
                tracing::debug!(entry = ?e.orig, error = %err, "cannot delete a conntrack entry");
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::super::compile::compile;
    use super::super::testutil::{e2e_state, ip_of, np};
    use super::*;

    #[test]
    fn touches_either_end_of_either_tuple() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let e = CtEntry::tcp(ip("10.244.2.2"), 40000, ip("10.244.1.3"), 80);
        assert!(touches(&e, &[ip("10.244.1.3")]));
        assert!(touches(&e, &[ip("10.244.2.2")]));
        assert!(!touches(&e, &[ip("10.244.1.4")]));
        assert!(!touches(&e, &[]));
        // DNAT: the pod appears only in the reply tuple.
        let mut nat = CtEntry::tcp(ip("10.244.2.2"), 40000, ip("10.96.0.10"), 53);
        nat.reply.as_mut().unwrap().src = ip("10.244.1.3");
        assert!(touches(&nat, &[ip("10.244.1.3")]));
        let unreplied = CtEntry {
            reply: None,
            ..CtEntry::tcp(ip("10.244.2.2"), 40000, ip("10.244.1.3"), 81)
        };
        assert!(touches(&unreplied, &[ip("10.244.1.3")]));
    }
    use crate::netfilter::conntrack::CtTuple;
    use serde_json::json;
    use std::net::IpAddr;

    /// x/a (node n1) admits ingress only from x/b on TCP 80; y/a (n1) may send only to port 81.
    fn model() -> CompiledPolicy {
        let state = e2e_state(vec![
            np(
                "x",
                "a-from-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                             "ports": [{"port": 80, "protocol": "TCP"}]}],
                "policyTypes": ["Ingress"]}),
            ),
            np(
                "y",
                "a-to-81",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "egress": [{"ports": [{"port": 81}]}], "policyTypes": ["Egress"]}),
            ),
        ]);
        compile(&state, "n1", &["172.30.0.11".parse().unwrap()])
    }

    #[test]
    fn cuts_what_the_new_policy_denies_and_nothing_else() {
        let m = model();
        let (xa, xb, xc, ya, yb) = (
            ip_of("x", "a"),
            ip_of("x", "b"),
            ip_of("x", "c"),
            ip_of("y", "a"),
            ip_of("y", "b"),
        );
        let node: IpAddr = "172.30.0.11".parse().unwrap();
        let outside: IpAddr = "192.0.2.9".parse().unwrap();
        let denied = [
            CtEntry::tcp(xc, 40000, xa, 80), // ingress of x/a: wrong peer
            CtEntry::tcp(xb, 40001, xa, 81), // ingress of x/a: wrong port
            CtEntry::tcp(ya, 40002, yb, 80), // egress of y/a: wrong port
            CtEntry::tcp(ya, 40003, outside, 443),
        ];
        let kept = [
            CtEntry::tcp(xb, 40004, xa, 80),      // allowed
            CtEntry::tcp(ya, 40005, yb, 81),      // allowed egress
            CtEntry::tcp(node, 40006, xa, 81),    // from the node: accepted before any policy
            CtEntry::tcp(ya, 40007, node, 10250), // to the node: input path, unfiltered
            CtEntry::tcp(xb, 40008, yb, 80), // no local pod isolated on either side (b is on n2)
            CtEntry::tcp(xa, 40009, outside, 53), // x/a is not isolated for egress
        ];
        let mut icmp = CtEntry::tcp(xc, 0, xa, 0);
        icmp.orig.proto = 1;
        let mut all: Vec<CtEntry> = denied.to_vec();
        all.extend(kept);
        all.push(icmp);
        assert_eq!(connections_to_cut(&m, &all), denied.to_vec());
        // Without policies nothing is cut.
        let open = compile(&e2e_state(vec![]), "n1", &[]);
        assert!(connections_to_cut(&open, &all).is_empty());
    }

    #[test]
    fn judges_the_destination_after_dnat() {
        let m = model();
        // x/c → a Service address, DNATed to x/a:80: denied by x/a's ingress.
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let mut e = CtEntry::tcp(ip_of("x", "c"), 40000, vip, 8080);
        e.reply = Some(CtTuple {
            src: ip_of("x", "a"),
            dst: ip_of("x", "c"),
            proto: IPPROTO_TCP,
            src_port: 80,
            dst_port: 40000,
        });
        assert!(denies(&m, &e));
        // x/b → the same Service: allowed.
        let mut e = CtEntry::tcp(ip_of("x", "b"), 40000, vip, 8080);
        e.reply.as_mut().unwrap().src = ip_of("x", "a");
        e.reply.as_mut().unwrap().src_port = 80;
        assert!(!denies(&m, &e));
        // Without a reply tuple the original destination is used.
        e.reply = None;
        assert!(!denies(&m, &e));
    }
}
