//! NetworkPolicy (networking.k8s.io/v1) for the pods of this node, enforced with nftables, plus
//! anti-spoofing on the pods' bridge ports.
//!
//! Pipeline: [`ClusterState`] → [`compile`] (pure) → [`CompiledPolicy`] → [`render`] (pure,
//! golden-tested) → [`Ruleset`] → [`diff`] against the ruleset in the kernel (pure) →
//! [`NftApplier::update`] (one `nft -f -` transaction). [`explain`] reads the same
//! [`CompiledPolicy`] the renderer does.
//!
//! # Kernel design
//!
//! Two tables, both owned by veilnet. The first load replaces them whole (declare, delete,
//! declare-with-content, in one transaction); every later change is the delta from the ruleset
//! in the kernel — `add`/`delete element` for set and map elements, `flush chain` + `add rule`
//! for the pod chains whose rules changed, objects added or deleted — also one transaction. A
//! label change is thus a few elements and chains whatever the size of the ruleset. Names of
//! per-pod chains, per-policy counters and per-peer-list sets stay the same from one render to
//! the next (see `ruleset`), which is what lets the diff work on elements.
//!
//! **`table inet veilnet`** — policy.
//! - `chain forward` (hook forward, priority filter, policy accept):
//!   `ct state established accept` (replies and ongoing allowed connections); related packets
//!   (ICMP errors) only from non-pod addresses or from an end of the connection they refer to
//!   (`@pod_self_v4/6`: `x . x` per pod address), else counted (`forged_related`) and dropped;
//!   `ct state invalid drop`; with [`CompileOptions::tcp_new_needs_syn`] (strict mode, see
//!   `conntrack`) new TCP packets that are no SYN are dropped; traffic from the node's own
//!   addresses (`@node_v4/6`) is accepted;
//!   then `ip saddr vmap @egress_v4` and `ip daddr vmap @ingress_v4` (and v6). The maps send a
//!   local pod's IP to that pod's chain, so the per-packet cost is two hash lookups plus the rules
//!   of the policies that select this very pod, whatever the total number of policies.
//! - `chain ing_<n>` / `egr_<n>`: one per local pod and direction in which the pod is isolated.
//!   Each allow rule matches the rule's peers (`ip saddr @peer_<k>_v4`, an interval set of pod
//!   IPs and ipBlock CIDRs minus excepts) and ports (`meta l4proto . th dport @port_<k>`, an
//!   interval set of `protocol . port-range`, so endPort and SCTP are one element each); egress
//!   named ports match `ip daddr . meta l4proto . th dport @dest_<k>_v4`, because they resolve
//!   against the destination pod. Allow rules count into the policy's named counter `pol_<n>`;
//!   ingress allows `accept`, egress allows `return` (so the destination's ingress chain still
//!   runs). The chain ends with a rate-limited `log group 100 prefix "veilnet:deny:..."` and a
//!   `drop` counted in `deny_ingress` / `deny_egress`.
//! - There is one peer set per distinct peer list (the policy's namespace and its peers as
//!   written), so a thousand rules with the same peers share one set, and a label change adds or
//!   removes elements of the sets it affects instead of creating new ones.
//!
//! Where traffic meets the forward hook: routed pod traffic (to/from the VXLAN or WireGuard
//! device) does naturally; bridged same-node pod↔pod frames do because br_netfilter
//! (`bridge-nf-call-iptables=1`, set per netns by [`enable_bridge_netfilter`]) passes bridged
//! IPv4/IPv6 through the inet forward hook with conntrack. The node's own traffic to its pods
//! leaves through `output`, which veilnet does not filter (kubelet probes always work), and pods'
//! traffic to the node arrives through `input`, also unfiltered. Only local pods are enforced:
//! the maps hold local pod IPs only; peers are matched by IP, wherever they run.
//!
//! **`table bridge veilnet`** — anti-spoofing, no conntrack needed.
//! - `chain prerouting` (bridge hook prerouting, priority filter):
//!   `iifname vmap @pod_ports` sends frames from a pod's host veth to `port_<n>` with `goto` (so
//!   the chain's `return` ends the hook with its accept policy instead of falling through to the
//!   unknown-port drop below), which returns only for IPv4 from the pod's own MAC and IP, and ARP whose sender MAC and IP are the pod's
//!   (IPv6 only if the pod has IPv6 addresses). Everything else from that port is logged
//!   (`veilnet:spoof:<ns>/<pod>`) and dropped, counted in `spoofed`. With
//!   [`CompileOptions::drop_unknown_pod_ports`], frames from `veil*` ports unknown to the model
//!   are dropped too. Each port chain starts by dropping (logged, counted) every frame to the
//!   link-local groups `01:80:c2:00:00:00/44`, whatever its source.
//! - `chain input` (bridge hook input): the link-local groups the bridge handles locally
//!   (`…:02`–`0d`, `0f`) never reach prerouting; the same port chains see them here, before the
//!   bridge could learn from them. (Pod ports forward LLDP, `…:0e`, which has no hook on the local
//!   path, through prerouting with their `group_fwd_mask`; `…:01`, pause, the bridge drops itself.)
//!   Pod ports do not learn at all (the CNI plugin pins the pod's MAC as a static FDB entry).
//!
//! SCTP rules are plain set elements (`sctp . 80`) and need no SCTP kernel module.
//! Named counters live as long as their policy selects a local pod: incremental updates keep them
//! (flushing a chain does not touch the counter objects its rules count into), and the applier
//! reads the few a change destroys right before it, for the agent to bank. They are read with one
//! netlink dump of the counter objects ([`crate::netfilter::counters`]), not with `nft list`,
//! which would fetch the whole ruleset first. Scripts, counters, NFLOG and conntrack all go
//! through [`crate::netfilter`]; this module decides what to say, never how.

mod addrset;
mod apply;
pub mod cli;
mod compile;
pub mod conntrack;
mod diff;
mod explain;
pub mod flow;
mod logprefix;
mod model;
mod render;
mod ruleset;
mod selector;

pub use crate::netfilter::CounterValue;
pub use addrset::AddrSet;
pub use apply::{enable_bridge_netfilter, parse_counters, ApplyOutcome, NftApplier};
pub use compile::{
    compile, compile_with, AntiSpoofPort, CompileOptions, CompiledPolicy, CompiledRule, DestTuple,
    Direction, PodChain, PortRange, PortSet, RuleMatch, Warning,
};
pub use diff::{diff, Delta, Op, Plan};
pub use explain::{explain, Decision, Endpoint, Explainer, Explanation, RuleRef};
pub use logprefix::{
    allow_prefix, deny_prefix, parse_prefix, spoof_prefix, LogPrefix, LogVerdict, MAX_PREFIX_LEN,
};
pub use model::{
    ClusterState, InvalidMac, MacAddr, NamedPort, NamespaceInfo, ObjectRef, PodInfo, Protocol,
    NAMESPACE_NAME_LABEL,
};
pub use render::{
    render, render_nft, DnsCount, DENY_EGRESS_COUNTER, DENY_INGRESS_COUNTER, SPOOF_COUNTER,
};
pub use ruleset::{Family, NftObject, NftTable, ObjectKind, Ruleset, TABLE};
pub use selector::Selector;

/// Errors of applying policy to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Netfilter(#[from] crate::netfilter::NetfilterError),
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("cannot enable br_netfilter in netns {netns}: {source}")]
    BrNetfilter {
        netns: String,
        source: std::io::Error,
    },
    #[error("unexpected nft JSON output: {0}")]
    Json(String),
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
