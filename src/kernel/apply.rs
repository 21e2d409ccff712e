//! Reconciling the kernel with a [`DesiredOverlay`]: snapshot, pure diff ([`plan`]), apply only
//! the difference ([`apply`]).
//!
//! Rules the diff keeps:
//! - a link that exists with compatible settings is fixed in place (MTU, MAC, up, addresses) and
//!   never recreated, so an agent restart never flaps it or changes its ifindex; only a VXLAN link
//!   whose creation-time attributes (VNI, port, local, underlay device, learning) differ, or a
//!   link of the wrong kind holding our name, is replaced; the bridge's options
//!   ([`POD_BRIDGE_OPTIONS`]: no link-local learning, a cap on learned FDB entries) are set in
//!   place too;
//! - routes are managed only if they are ours ([`VEILNET_ROUTE_PROTOCOL`]) *and* on a veilnet
//!   device; neighbour and FDB entries only if permanent and on the VXLAN device. Everything else
//!   (kernel routes for addresses, an admin's routes, other links) is left alone;
//! - a peer's entries are added FDB → neighbour → route and removed in the reverse order, so a
//!   route never points into a half-programmed path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    BridgeAttrs, ErrnoClass, KernelError, KernelRoute, LinkChange, LinkKind, NewLink, NewLinkKind,
    ObservedAddress, ObservedFdb, ObservedLink, ObservedNeigh, ObservedRoute, ObservedRule,
    OverlayKernel, VxlanAttrs, POD_BRIDGE_OPTIONS, VEILNET_ROUTE_PROTOCOL,
};
use crate::model::overlay::{
    DesiredOverlay, FdbSpec, LinkSpec, NeighSpec, RouteSpec, RuleSpec, VxlanSpec, MAIN_TABLE,
};
use crate::model::MacAddr;

/// A link the overlay wants, with its kind-specific settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredLink {
    Bridge(LinkSpec),
    Vxlan(VxlanSpec),
}

impl DesiredLink {
    pub fn spec(&self) -> &LinkSpec {
        match self {
            DesiredLink::Bridge(spec) => spec,
            DesiredLink::Vxlan(vx) => &vx.link,
        }
    }
}

/// One kernel write. Devices are named; the executor resolves names to ifindexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Removes a link that holds our name but cannot be fixed in place.
    DeleteLink {
        name: String,
        reason: String,
    },
    CreateLink(DesiredLink),
    SetLink {
        name: String,
        mtu: Option<u32>,
        mac: Option<MacAddr>,
        up: bool,
        /// Bridge options that differ (only their `Some` fields are written).
        bridge: Option<BridgeAttrs>,
    },
    DelAddress {
        dev: String,
        addr: IpNet,
    },
    AddAddress {
        dev: String,
        addr: IpNet,
    },
    DelRule(RuleSpec),
    DelRoute(RouteSpec),
    DelNeigh(NeighSpec),
    DelFdb(FdbSpec),
    ReplaceFdb(FdbSpec),
    ReplaceNeigh(NeighSpec),
    ReplaceRoute(RouteSpec),
    AddRule(RuleSpec),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::DeleteLink { name, reason } => write!(f, "delete link {name} ({reason})"),
            Op::CreateLink(l) => write!(f, "create link {}", l.spec().name),
            Op::SetLink {
                name,
                mtu,
                mac,
                up,
                bridge,
            } => {
                write!(f, "set link {name}")?;
                if let Some(mtu) = mtu {
                    write!(f, " mtu {mtu}")?;
                }
                if let Some(mac) = mac {
                    write!(f, " address {mac}")?;
                }
                if let Some(b) = bridge {
                    if let Some(v) = b.no_linklocal_learn {
                        write!(f, " no_linklocal_learn {}", u8::from(v))?;
                    }
                    if let Some(v) = b.fdb_max_learned {
                        write!(f, " fdb_max_learned {v}")?;
                    }
                }
                if *up {
                    write!(f, " up")?;
                }
                Ok(())
            }
            Op::DelAddress { dev, addr } => write!(f, "del address {addr} dev {dev}"),
            Op::AddAddress { dev, addr } => write!(f, "add address {addr} dev {dev}"),
            Op::DelRule(r) => write!(f, "del rule {}", rule_text(r)),
            Op::AddRule(r) => write!(f, "add rule {}", rule_text(r)),
            Op::DelRoute(r) => write!(f, "del route {}", route_text(r)),
            Op::ReplaceRoute(r) => write!(f, "replace route {}", route_text(r)),
            Op::DelNeigh(n) => write!(f, "del neigh {} lladdr {} dev {}", n.ip, n.mac, n.dev),
            Op::ReplaceNeigh(n) => {
                write!(f, "replace neigh {} lladdr {} dev {}", n.ip, n.mac, n.dev)
            }
            Op::DelFdb(e) => write!(f, "del fdb {} dst {} dev {}", e.mac, e.dst, e.dev),
            Op::ReplaceFdb(e) => write!(f, "replace fdb {} dst {} dev {}", e.mac, e.dst, e.dev),
        }
    }
}

fn route_text(r: &RouteSpec) -> String {
    let via = r.via.map(|v| format!(" via {v}")).unwrap_or_default();
    let onlink = if r.onlink { " onlink" } else { "" };
    let src = r.src.map(|s| format!(" src {s}")).unwrap_or_default();
    let table = if r.table == MAIN_TABLE {
        String::new()
    } else {
        format!(" table {}", r.table)
    };
    format!("{}{via} dev {}{onlink}{src}{table}", r.dst, r.dev)
}

fn rule_text(r: &RuleSpec) -> String {
    format!("from {} lookup {} priority {}", r.src, r.table, r.priority)
}

/// A snapshot of what the applier may need to look at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualState {
    pub links: Vec<ObservedLink>,
    pub addresses: Vec<ObservedAddress>,
    pub routes: Vec<ObservedRoute>,
    pub rules: Vec<ObservedRule>,
    /// Neighbours on the VXLAN device (if it exists).
    pub neighbours: Vec<ObservedNeigh>,
    /// FDB entries of the VXLAN device (if it exists).
    pub fdb: Vec<ObservedFdb>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("underlay device {name} does not exist")]
    MissingUnderlay { name: String },
    #[error("link {name} is still missing after creating it")]
    LinkVanished { name: String },
    #[error("reading kernel state: {0}")]
    Read(#[source] KernelError),
    #[error("{op}: {source}")]
    Link {
        op: String,
        #[source]
        source: KernelError,
    },
    #[error("{} of {} writes failed, first: {}", failed.len(), failed.len() + applied, failed[0])]
    Incomplete {
        applied: usize,
        failed: Vec<FailedOp>,
    },
}

#[derive(Debug)]
pub struct FailedOp {
    pub op: Op,
    pub error: KernelError,
}

impl fmt::Display for FailedOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.error)
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Every write issued, in order. Empty when the kernel already matched.
    pub ops: Vec<Op>,
    /// Links that had to be deleted and recreated.
    pub recreated_links: Vec<String>,
}

impl ApplyReport {
    pub fn writes(&self) -> usize {
        self.ops.len()
    }
}

fn is_kernel_link_local(addr: &IpNet) -> bool {
    match addr.addr() {
        // fe80::/10: the kernel assigns these itself; they are not ours to manage.
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(_) => false,
    }
}

/// Why an existing link cannot be reused, if it cannot.
fn incompatibility(
    actual: &ObservedLink,
    desired: &DesiredLink,
    underlay_index: Option<u32>,
) -> Option<String> {
    match desired {
        DesiredLink::Bridge(_) => (actual.kind != LinkKind::Bridge)
            .then(|| format!("is a {:?}, not a bridge", actual.kind)),
        DesiredLink::Vxlan(vx) => {
            if actual.kind != LinkKind::Vxlan {
                return Some(format!("is a {:?}, not a VXLAN device", actual.kind));
            }
            let have = actual.vxlan.clone().unwrap_or_default();
            let want = VxlanAttrs {
                vni: Some(vx.vni),
                port: Some(vx.port),
                local: Some(vx.local),
                underlay_index,
                learning: Some(vx.learning),
            };
            let mut diffs = Vec::new();
            if have.vni != want.vni {
                diffs.push(format!("vni {:?} → {}", have.vni, vx.vni));
            }
            if have.port != want.port {
                diffs.push(format!("port {:?} → {}", have.port, vx.port));
            }
            if have.local != want.local {
                diffs.push(format!("local {:?} → {}", have.local, vx.local));
            }
            if have.underlay_index != want.underlay_index {
                diffs.push(format!(
                    "underlay ifindex {:?} → {:?} ({})",
                    have.underlay_index, underlay_index, vx.underlay_dev
                ));
            }
            // The kernel omits IFLA_VXLAN_LEARNING on some versions when it is off.
            if have.learning.unwrap_or(false) != vx.learning {
                diffs.push(format!("learning {:?} → {}", have.learning, vx.learning));
            }
            (!diffs.is_empty()).then(|| diffs.join(", "))
        }
    }
}

/// The bridge options of [`POD_BRIDGE_OPTIONS`] that `actual` lacks, if any. `fdb_max_learned` is
/// left alone where the kernel does not report it (before 6.8 it has no such option).
fn bridge_options_change(actual: &ObservedLink) -> Option<BridgeAttrs> {
    let have = actual.bridge.unwrap_or_default();
    let want = POD_BRIDGE_OPTIONS;
    let change = BridgeAttrs {
        no_linklocal_learn: (have.no_linklocal_learn != want.no_linklocal_learn)
            .then_some(want.no_linklocal_learn)
            .flatten(),
        fdb_max_learned: (have.fdb_max_learned.is_some()
            && have.fdb_max_learned != want.fdb_max_learned)
            .then_some(want.fdb_max_learned)
            .flatten(),
    };
    (change != BridgeAttrs::default()).then_some(change)
}

/// The pure diff: the writes that turn `actual` into `desired`, in a safe order.
pub fn plan(actual: &ActualState, desired: &DesiredOverlay) -> Vec<Op> {
    let underlay_index = actual
        .links
        .iter()
        .find(|l| l.name == desired.vxlan.underlay_dev)
        .map(|l| l.index);
    let wanted = [
        DesiredLink::Bridge(desired.bridge.clone()),
        DesiredLink::Vxlan(desired.vxlan.clone()),
    ];

    let mut ops = Vec::new();
    let mut creates = Vec::new();
    let mut sets = Vec::new();
    let mut addr_ops = Vec::new();
    // Devices whose kernel objects are all about to disappear (or never existed).
    let mut fresh: BTreeSet<String> = BTreeSet::new();
    let mut index_to_name: BTreeMap<u32, String> = BTreeMap::new();
    let mut neigh_flushed: BTreeSet<String> = BTreeSet::new();

    for want in &wanted {
        let spec = want.spec();
        let existing = actual.links.iter().find(|l| l.name == spec.name);
        let reusable = match existing {
            None => None,
            Some(link) => match incompatibility(link, want, underlay_index) {
                Some(reason) => {
                    ops.push(Op::DeleteLink {
                        name: spec.name.clone(),
                        reason,
                    });
                    None
                }
                None => Some(link),
            },
        };
        let Some(link) = reusable else {
            fresh.insert(spec.name.clone());
            creates.push(Op::CreateLink(want.clone()));
            addr_ops.extend(spec.addresses.iter().map(|addr| Op::AddAddress {
                dev: spec.name.clone(),
                addr: *addr,
            }));
            continue;
        };
        index_to_name.insert(link.index, link.name.clone());
        let mtu = (link.mtu != spec.mtu).then_some(spec.mtu);
        let mac = (link.mac != Some(spec.mac)).then_some(spec.mac);
        if mac.is_some() {
            // The kernel flushes a device's neighbour table, permanent entries included, when
            // its MAC changes: whatever the dump showed will be gone.
            neigh_flushed.insert(spec.name.clone());
        }
        let bridge = match want {
            DesiredLink::Bridge(_) => bridge_options_change(link),
            DesiredLink::Vxlan(_) => None,
        };
        if mtu.is_some() || mac.is_some() || !link.up || bridge.is_some() {
            sets.push(Op::SetLink {
                name: spec.name.clone(),
                mtu,
                mac,
                up: !link.up,
                bridge,
            });
        }
        let have: BTreeSet<IpNet> = actual
            .addresses
            .iter()
            .filter(|a| a.index == link.index && !is_kernel_link_local(&a.addr))
            .map(|a| a.addr)
            .collect();
        addr_ops.extend(have.difference(&spec.addresses).map(|addr| Op::DelAddress {
            dev: spec.name.clone(),
            addr: *addr,
        }));
        addr_ops.extend(spec.addresses.difference(&have).map(|addr| Op::AddAddress {
            dev: spec.name.clone(),
            addr: *addr,
        }));
    }
    // Devices created by someone else (the WireGuard TUN): their routes are ours to manage.
    for name in &desired.external_devices {
        if let Some(link) = actual.links.iter().find(|l| &l.name == name) {
            index_to_name.insert(link.index, link.name.clone());
        }
    }
    ops.extend(creates);
    ops.extend(sets);
    // Deletions first: a changed prefix on the same address must free the old one.
    addr_ops.sort_by_key(|op| !matches!(op, Op::DelAddress { .. }));
    ops.extend(addr_ops);

    let managed_name = |index: u32| -> Option<&String> {
        index_to_name
            .get(&index)
            .filter(|name| !fresh.contains(*name))
    };
    let vxlan_name = &desired.vxlan.link.name;
    let vxlan_alive = !fresh.contains(vxlan_name);

    // Routes: keyed by table and destination, so moving a peer to another device is one in-place
    // replace.
    let mut have_routes: BTreeMap<(u32, IpNet), Vec<RouteSpec>> = BTreeMap::new();
    for r in &actual.routes {
        if r.protocol != VEILNET_ROUTE_PROTOCOL {
            continue;
        }
        let Some(dev) = r.oif.and_then(managed_name) else {
            continue;
        };
        have_routes
            .entry((r.table, r.dst))
            .or_default()
            .push(RouteSpec {
                dst: r.dst,
                via: r.via,
                dev: dev.clone(),
                onlink: r.onlink,
                src: r.src,
                table: r.table,
            });
    }
    let want_routes: BTreeMap<(u32, IpNet), &RouteSpec> = desired
        .routes
        .iter()
        .map(|r| ((r.table, r.dst), r))
        .collect();
    let mut del_routes = Vec::new();
    let mut put_routes = Vec::new();
    for (dst, have) in &have_routes {
        match want_routes.get(dst) {
            None => del_routes.extend(have.iter().cloned().map(Op::DelRoute)),
            Some(want) if have.contains(want) => {
                del_routes.extend(have.iter().filter(|r| r != want).cloned().map(Op::DelRoute))
            }
            Some(want) => {
                // Keep one to be overwritten in place; drop any others.
                del_routes.extend(have.iter().skip(1).cloned().map(Op::DelRoute));
                put_routes.push(Op::ReplaceRoute((*want).clone()));
            }
        }
    }
    for (dst, want) in &want_routes {
        if !have_routes.contains_key(dst) {
            put_routes.push(Op::ReplaceRoute((*want).clone()));
        }
    }

    // Neighbours: permanent ones on the VXLAN device, keyed by address.
    let mut have_neigh: BTreeMap<IpAddr, NeighSpec> = BTreeMap::new();
    if vxlan_alive && !neigh_flushed.contains(vxlan_name) {
        for n in &actual.neighbours {
            if !n.permanent || managed_name(n.index) != Some(vxlan_name) {
                continue;
            }
            if let Some(mac) = n.mac {
                have_neigh.insert(
                    n.ip,
                    NeighSpec {
                        dev: vxlan_name.clone(),
                        ip: n.ip,
                        mac,
                    },
                );
            }
        }
    }
    let want_neigh: BTreeMap<IpAddr, &NeighSpec> = desired
        .neighbours
        .iter()
        .filter(|n| &n.dev == vxlan_name)
        .map(|n| (n.ip, n))
        .collect();
    let del_neigh = have_neigh
        .iter()
        .filter(|(ip, _)| !want_neigh.contains_key(ip))
        .map(|(_, n)| Op::DelNeigh(n.clone()));
    let put_neigh: Vec<Op> = want_neigh
        .iter()
        .filter(|(ip, want)| have_neigh.get(ip) != Some(**want))
        .map(|(_, want)| Op::ReplaceNeigh((*want).clone()))
        .collect();

    // FDB: permanent unicast entries with a destination on the VXLAN device.
    let mut have_fdb: BTreeMap<MacAddr, Vec<FdbSpec>> = BTreeMap::new();
    if vxlan_alive {
        for e in &actual.fdb {
            let (Some(dst), true) = (e.dst, e.permanent) else {
                continue;
            };
            if !e.mac.is_usable_unicast() || managed_name(e.index) != Some(vxlan_name) {
                continue;
            }
            have_fdb.entry(e.mac).or_default().push(FdbSpec {
                dev: vxlan_name.clone(),
                mac: e.mac,
                dst,
            });
        }
    }
    let want_fdb: BTreeMap<MacAddr, &FdbSpec> = desired
        .fdb
        .iter()
        .filter(|e| &e.dev == vxlan_name)
        .map(|e| (e.mac, e))
        .collect();
    let mut del_fdb = Vec::new();
    let mut put_fdb = Vec::new();
    for (mac, have) in &have_fdb {
        match want_fdb.get(mac) {
            Some(want) if have.contains(want) => {
                del_fdb.extend(have.iter().filter(|e| e != want).cloned().map(Op::DelFdb))
            }
            // A MAC may carry several destinations; drop the wrong ones, then add the right one.
            _ => del_fdb.extend(have.iter().cloned().map(Op::DelFdb)),
        }
    }
    for (mac, want) in &want_fdb {
        let ok = have_fdb.get(mac).is_some_and(|have| have.contains(want));
        if !ok {
            put_fdb.push(Op::ReplaceFdb((*want).clone()));
        }
    }

    // Rules: ours carry our protocol; added after the routes they lead to, removed before them.
    let have_rules: BTreeSet<RuleSpec> = actual
        .rules
        .iter()
        .filter(|r| r.protocol == VEILNET_ROUTE_PROTOCOL)
        .filter_map(|r| {
            Some(RuleSpec {
                priority: r.priority,
                src: r.src?,
                table: r.table,
            })
        })
        .collect();
    let del_rules = have_rules
        .difference(&desired.rules)
        .cloned()
        .map(Op::DelRule);
    let add_rules: Vec<Op> = desired
        .rules
        .difference(&have_rules)
        .cloned()
        .map(Op::AddRule)
        .collect();

    ops.extend(del_rules);
    ops.extend(del_routes);
    ops.extend(del_neigh);
    ops.extend(del_fdb);
    ops.extend(put_fdb);
    ops.extend(put_neigh);
    ops.extend(put_routes);
    ops.extend(add_rules);
    ops
}

async fn snapshot<K: OverlayKernel>(
    kernel: &mut K,
    vxlan_name: &str,
) -> Result<ActualState, KernelError> {
    let links = kernel.dump_links().await?;
    let addresses = kernel.dump_addresses().await?;
    let routes = kernel.dump_routes().await?;
    let rules = kernel.dump_rules().await?;
    let (neighbours, fdb) = match links.iter().find(|l| l.name == vxlan_name) {
        Some(vx) => (
            kernel.dump_neighbours(vx.index).await?,
            kernel.dump_fdb(vx.index).await?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    Ok(ActualState {
        links,
        addresses,
        routes,
        rules,
        neighbours,
        fdb,
    })
}

fn index_of(links: &[ObservedLink], name: &str) -> Option<u32> {
    links.iter().find(|l| l.name == name).map(|l| l.index)
}

/// Brings the kernel to `desired`, writing only what differs. Link-level failures stop the run
/// (nothing can hang off a missing link); per-peer entry failures are collected and reported
/// together so one bad entry never blocks the rest.
pub async fn apply<K: OverlayKernel>(
    kernel: &mut K,
    desired: &DesiredOverlay,
) -> Result<ApplyReport, ApplyError> {
    let actual = snapshot(kernel, &desired.vxlan.link.name)
        .await
        .map_err(ApplyError::Read)?;
    let underlay_index = index_of(&actual.links, &desired.vxlan.underlay_dev).ok_or_else(|| {
        ApplyError::MissingUnderlay {
            name: desired.vxlan.underlay_dev.clone(),
        }
    })?;
    let ops = plan(&actual, desired);
    let mut report = ApplyReport::default();
    let mut links = actual.links;
    let mut failed = Vec::new();

    for op in ops {
        let result = execute(kernel, &op, &mut links, underlay_index).await;
        match result {
            Ok(()) => {
                if let Op::DeleteLink { name, reason } = &op {
                    tracing::warn!(link = %name, %reason, "replacing incompatible link");
                    report.recreated_links.push(name.clone());
                } else {
                    tracing::debug!(op = %op, "applied");
                }
                report.ops.push(op);
            }
            Err(StepError::Fatal(e)) => return Err(*e),
            Err(StepError::Entry(error)) => {
                tracing::warn!(op = %op, %error, "overlay write failed");
                failed.push(FailedOp { op, error });
            }
        }
    }
    if failed.is_empty() {
        Ok(report)
    } else {
        Err(ApplyError::Incomplete {
            applied: report.ops.len(),
            failed,
        })
    }
}

enum StepError {
    Fatal(Box<ApplyError>),
    Entry(KernelError),
}

/// Deletions whose target is already gone have reached their goal.
fn tolerate_gone(result: Result<(), KernelError>) -> Result<(), KernelError> {
    match result {
        Err(e) if e.class().is_some_and(ErrnoClass::means_gone) => Ok(()),
        other => other,
    }
}

async fn execute<K: OverlayKernel>(
    kernel: &mut K,
    op: &Op,
    links: &mut Vec<ObservedLink>,
    underlay_index: u32,
) -> Result<(), StepError> {
    let link_err = |source: KernelError| {
        StepError::Fatal(Box::new(ApplyError::Link {
            op: op.to_string(),
            source,
        }))
    };
    let resolve = |links: &[ObservedLink], name: &str| {
        index_of(links, name).ok_or_else(|| {
            StepError::Fatal(Box::new(ApplyError::LinkVanished {
                name: name.to_string(),
            }))
        })
    };
    match op {
        Op::DeleteLink { name, .. } => {
            let index = resolve(links, name)?;
            tolerate_gone(kernel.delete_link(index).await).map_err(link_err)?;
            links.retain(|l| l.index != index);
        }
        Op::CreateLink(want) => {
            let spec = want.spec();
            let kind = match want {
                DesiredLink::Bridge(_) => NewLinkKind::Bridge,
                DesiredLink::Vxlan(vx) => NewLinkKind::Vxlan {
                    vni: vx.vni,
                    port: vx.port,
                    local: vx.local,
                    underlay_index,
                    learning: vx.learning,
                },
            };
            let new = NewLink {
                name: spec.name.clone(),
                mtu: spec.mtu,
                mac: spec.mac,
                kind,
            };
            kernel.create_link(&new).await.map_err(link_err)?;
            // Learn the new ifindex for the ops that follow.
            *links = kernel.dump_links().await.map_err(link_err)?;
            resolve(links, &spec.name)?;
        }
        Op::SetLink {
            name,
            mtu,
            mac,
            up,
            bridge,
        } => {
            let index = resolve(links, name)?;
            let change = LinkChange {
                mtu: *mtu,
                mac: *mac,
                up: *up,
                bridge: *bridge,
            };
            kernel.set_link(index, &change).await.map_err(link_err)?;
        }
        Op::AddAddress { dev, addr } => {
            let index = resolve(links, dev)?;
            match kernel.add_address(index, *addr).await {
                Err(e) if e.class() == Some(ErrnoClass::Exists) => {}
                other => other.map_err(link_err)?,
            }
        }
        Op::DelAddress { dev, addr } => {
            let index = resolve(links, dev)?;
            tolerate_gone(kernel.del_address(index, *addr).await).map_err(link_err)?;
        }
        Op::DelRoute(r) | Op::ReplaceRoute(r) => {
            let route = KernelRoute {
                dst: r.dst,
                via: r.via,
                oif: resolve(links, &r.dev)?,
                onlink: r.onlink,
                src: r.src,
                table: r.table,
            };
            let result = if matches!(op, Op::DelRoute(_)) {
                tolerate_gone(kernel.del_route(&route).await)
            } else {
                kernel.replace_route(&route).await
            };
            result.map_err(StepError::Entry)?;
        }
        Op::DelRule(r) => {
            tolerate_gone(kernel.del_rule(r).await).map_err(StepError::Entry)?;
        }
        Op::AddRule(r) => match kernel.add_rule(r).await {
            Err(e) if e.class() == Some(ErrnoClass::Exists) => {}
            other => other.map_err(StepError::Entry)?,
        },
        Op::DelNeigh(n) => {
            let index = resolve(links, &n.dev)?;
            tolerate_gone(kernel.del_neigh(index, n.ip).await).map_err(StepError::Entry)?;
        }
        Op::ReplaceNeigh(n) => {
            let index = resolve(links, &n.dev)?;
            kernel
                .replace_neigh(index, n.ip, n.mac)
                .await
                .map_err(StepError::Entry)?;
        }
        Op::DelFdb(e) => {
            let index = resolve(links, &e.dev)?;
            tolerate_gone(kernel.del_fdb(index, e.mac, e.dst).await).map_err(StepError::Entry)?;
        }
        Op::ReplaceFdb(e) => {
            let index = resolve(links, &e.dev)?;
            kernel
                .replace_fdb(index, e.mac, e.dst)
                .await
                .map_err(StepError::Entry)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fake::FakeKernel;
    use crate::model::annotations;
    use crate::model::overlay::{plan_overlay, OverlayInput, SelfNode, VxlanConfig};
    use crate::model::peer::{NodeFacts, PeerRecord};

    fn peer(name: &str, ip: &str, mac: &str, cidr: &str) -> PeerRecord {
        PeerRecord::parse(
            name,
            &[(annotations::UNDERLAY_IP, ip), (annotations::VTEP_MAC, mac)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            &Default::default(),
            NodeFacts {
                pod_cidrs: vec![cidr.parse().unwrap()],
                node_addresses: vec![ip.parse().unwrap()],
                created: None,
            },
        )
    }

    fn desired_with(peers: Vec<PeerRecord>) -> DesiredOverlay {
        plan_overlay(&OverlayInput {
            incumbents: Default::default(),
            node: SelfNode {
                name: "node-a".into(),
                underlay_ip: "192.168.50.1".parse().unwrap(),
                underlay_dev: "eth0".into(),
                pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
                vtep_mac: None,
            },
            vxlan: VxlanConfig::default(),
            underlay_mtu: 1500,
            peers,
        })
        .unwrap()
    }

    fn two_peers() -> DesiredOverlay {
        desired_with(vec![
            peer(
                "node-b",
                "192.168.50.2",
                "02:00:00:00:00:0b",
                "10.244.2.0/24",
            ),
            peer(
                "node-c",
                "192.168.50.3",
                "02:00:00:00:00:0c",
                "10.244.3.0/24",
            ),
        ])
    }

    fn kernel() -> FakeKernel {
        let mut k = FakeKernel::new();
        k.add_device("eth0", 1500);
        k
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn rules_and_the_pod_to_node_table_are_managed_and_idempotent() {
        use crate::model::overlay::POD_TO_NODE_TABLE;
        let mut k = kernel();
        k.add_device("veilwg0", 1440);
        // Someone else's rule survives.
        k.insert_rule(ObservedRule {
            priority: 100,
            src: Some("10.9.0.0/16".parse().unwrap()),
            table: 200,
            protocol: 4,
        });
        let mut desired = two_peers();
        desired.external_devices.insert("veilwg0".into());
        let rule = RuleSpec {
            priority: 86,
            src: "10.244.1.0/24".parse().unwrap(),
            table: POD_TO_NODE_TABLE,
        };
        desired.rules.insert(rule.clone());
        let node_route = RouteSpec {
            table: POD_TO_NODE_TABLE,
            ..RouteSpec::main("192.168.50.2/32".parse().unwrap(), None, "veilwg0", false)
        };
        desired.routes.insert(node_route.clone());
        // The same destination in the main table is a different route.
        desired.routes.insert(RouteSpec::main(
            "192.168.50.2/32".parse().unwrap(),
            None,
            "veilwg0",
            false,
        ));
        let first = run(apply(&mut k, &desired)).unwrap();
        let text: Vec<String> = first.ops.iter().map(ToString::to_string).collect();
        assert_eq!(
            text.last().unwrap(),
            "add rule from 10.244.1.0/24 lookup 86 priority 86",
            "the rule comes after the routes it leads to: {text:?}"
        );
        assert!(text.contains(&"replace route 192.168.50.2/32 dev veilwg0 table 86".to_string()));
        assert!(text.contains(&"replace route 192.168.50.2/32 dev veilwg0".to_string()));
        assert_eq!(run(apply(&mut k, &desired)).unwrap().writes(), 0);
        desired.rules.clear();
        desired.routes.remove(&node_route);
        let last = run(apply(&mut k, &desired)).unwrap();
        let text: Vec<String> = last.ops.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            vec![
                "del rule from 10.244.1.0/24 lookup 86 priority 86",
                "del route 192.168.50.2/32 dev veilwg0 table 86"
            ]
        );
        assert_eq!(k.state().rules.len(), 1, "only the foreign rule is left");
    }

    #[test]
    fn routes_on_an_external_device_are_managed_and_idempotent() {
        let mut k = kernel();
        k.add_device("veilwg0", 1440);
        let mut desired = two_peers();
        desired.external_devices.insert("veilwg0".into());
        // node-b goes through the WireGuard TUN instead of VXLAN.
        let dst: IpNet = "10.244.2.0/24".parse().unwrap();
        desired.routes.retain(|r| r.dst != dst);
        desired
            .routes
            .insert(RouteSpec::main(dst, None, "veilwg0", false));
        run(apply(&mut k, &desired)).unwrap();
        let second = run(apply(&mut k, &desired)).unwrap();
        assert_eq!(
            second.writes(),
            0,
            "a route on the TUN must not be rewritten every pass"
        );

        // Dropping the peer removes its route from the TUN too.
        let mut without = desired.clone();
        without.routes.retain(|r| r.dst != dst);
        let actual = run(snapshot(&mut k, "veilvx1")).unwrap();
        let text: Vec<String> = plan(&actual, &without)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(
            text[0].contains("10.244.2.0/24") && text[0].contains("veilwg0"),
            "{text:?}"
        );
    }

    #[test]
    fn plan_from_empty_creates_everything_in_order() {
        let mut k = kernel();
        let actual = run(snapshot(&mut k, "veilvx1")).unwrap();
        let ops = plan(&actual, &two_peers());
        let text: Vec<String> = ops.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "create link veilbr0",
                "create link veilvx1",
                "add address 10.244.1.1/24 dev veilbr0",
                "add address 10.244.1.0/32 dev veilvx1",
                "replace fdb 02:00:00:00:00:0b dst 192.168.50.2 dev veilvx1",
                "replace fdb 02:00:00:00:00:0c dst 192.168.50.3 dev veilvx1",
                "replace neigh 10.244.2.0 lladdr 02:00:00:00:00:0b dev veilvx1",
                "replace neigh 10.244.3.0 lladdr 02:00:00:00:00:0c dev veilvx1",
                "replace route 10.244.2.0/24 via 10.244.2.0 dev veilvx1 onlink src 192.168.50.1",
                "replace route 10.244.3.0/24 via 10.244.3.0 dev veilvx1 onlink src 192.168.50.1",
            ]
        );
    }

    #[test]
    fn apply_twice_writes_nothing_the_second_time() {
        let mut k = kernel();
        let desired = two_peers();
        let first = run(apply(&mut k, &desired)).unwrap();
        assert_eq!(first.writes(), 10);
        let writes = k.writes().len();
        assert_eq!(writes, 10, "{:?}", k.writes());
        let indexes = (k.index_of("veilbr0"), k.index_of("veilvx1"));

        let second = run(apply(&mut k, &desired)).unwrap();
        assert!(second.ops.is_empty(), "{:?}", second.ops);
        assert_eq!(
            k.writes().len(),
            writes,
            "no kernel write on the second run"
        );
        assert_eq!((k.index_of("veilbr0"), k.index_of("veilvx1")), indexes);
    }

    #[test]
    fn removed_peer_loses_route_neigh_fdb_in_reverse_order_and_nothing_else() {
        let mut k = kernel();
        run(apply(&mut k, &two_peers())).unwrap();
        let one = desired_with(vec![peer(
            "node-b",
            "192.168.50.2",
            "02:00:00:00:00:0b",
            "10.244.2.0/24",
        )]);
        let report = run(apply(&mut k, &one)).unwrap();
        let text: Vec<String> = report.ops.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "del route 10.244.3.0/24 via 10.244.3.0 dev veilvx1 onlink src 192.168.50.1",
                "del neigh 10.244.3.0 lladdr 02:00:00:00:00:0c dev veilvx1",
                "del fdb 02:00:00:00:00:0c dst 192.168.50.3 dev veilvx1",
            ]
        );
        assert!(run(apply(&mut k, &one)).unwrap().ops.is_empty());
    }

    #[test]
    fn changed_peer_values_are_replaced_in_place() {
        let mut k = kernel();
        run(apply(&mut k, &two_peers())).unwrap();
        // node-c moved to a new underlay address and a new MAC.
        let moved = desired_with(vec![
            peer(
                "node-b",
                "192.168.50.2",
                "02:00:00:00:00:0b",
                "10.244.2.0/24",
            ),
            peer(
                "node-c",
                "192.168.50.33",
                "02:00:00:00:00:cc",
                "10.244.3.0/24",
            ),
        ]);
        let report = run(apply(&mut k, &moved)).unwrap();
        let text: Vec<String> = report.ops.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "del fdb 02:00:00:00:00:0c dst 192.168.50.3 dev veilvx1",
                "replace fdb 02:00:00:00:00:cc dst 192.168.50.33 dev veilvx1",
                "replace neigh 10.244.3.0 lladdr 02:00:00:00:00:cc dev veilvx1",
            ]
        );
        assert!(run(apply(&mut k, &moved)).unwrap().ops.is_empty());
    }

    #[test]
    fn unrelated_links_routes_and_entries_survive() {
        let mut k = kernel();
        let dummy = k.add_device("dummy0", 1500);
        k.insert_route(ObservedRoute {
            dst: "203.0.113.0/24".parse().unwrap(),
            via: None,
            oif: Some(dummy),
            onlink: false,
            protocol: 4,
            src: None,
            table: MAIN_TABLE,
        });
        run(apply(&mut k, &two_peers())).unwrap();
        let br = k.index_of("veilbr0").unwrap();
        let vx = k.index_of("veilvx1").unwrap();
        // An admin's static route on our bridge, our protocol on a foreign device, a dynamic
        // neighbour and a non-permanent FDB entry on the VXLAN device.
        k.insert_route(ObservedRoute {
            dst: "198.51.100.0/24".parse().unwrap(),
            via: None,
            oif: Some(br),
            onlink: false,
            protocol: 4,
            src: None,
            table: MAIN_TABLE,
        });
        k.insert_route(ObservedRoute {
            dst: "198.51.101.0/24".parse().unwrap(),
            via: None,
            oif: Some(dummy),
            onlink: false,
            protocol: VEILNET_ROUTE_PROTOCOL,
            src: None,
            table: MAIN_TABLE,
        });
        k.insert_neigh(ObservedNeigh {
            index: vx,
            ip: "10.244.9.9".parse().unwrap(),
            mac: Some("02:00:00:00:09:09".parse().unwrap()),
            permanent: false,
        });
        k.insert_fdb(ObservedFdb {
            index: vx,
            mac: "02:00:00:00:09:09".parse().unwrap(),
            dst: Some("192.168.50.9".parse().unwrap()),
            permanent: false,
        });
        let before = k.state();
        let report = run(apply(&mut k, &two_peers())).unwrap();
        assert!(report.ops.is_empty(), "{:?}", report.ops);
        assert_eq!(k.state(), before);
        // The kernel's own route for the bridge address is not ours either.
        assert!(k
            .state()
            .routes
            .iter()
            .any(|r| r.oif == Some(br) && r.protocol == 2));
        assert!(k.index_of("dummy0").is_some());
    }

    #[test]
    fn compatible_link_is_fixed_in_place() {
        let mut k = kernel();
        let desired = two_peers();
        run(apply(&mut k, &desired)).unwrap();
        let vx = k.index_of("veilvx1").unwrap();
        let br = k.index_of("veilbr0").unwrap();
        k.tamper_link(vx, |l| {
            l.mtu = 1300;
            l.up = false;
            l.mac = Some("02:99:99:99:99:99".parse().unwrap());
        });
        k.insert_address(br, "10.99.0.1/24".parse().unwrap());
        k.remove_address(br, "10.244.1.1/24".parse().unwrap());
        k.insert_address(br, "fe80::1/64".parse().unwrap());
        let report = run(apply(&mut k, &desired)).unwrap();
        let text: Vec<String> = report.ops.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                format!(
                    "set link veilvx1 mtu 1450 address {} up",
                    desired.vxlan.link.mac
                ),
                "del address 10.99.0.1/24 dev veilbr0".to_string(),
                "add address 10.244.1.1/24 dev veilbr0".to_string(),
                // The MAC change flushes the VXLAN device's neighbours.
                "replace neigh 10.244.2.0 lladdr 02:00:00:00:00:0b dev veilvx1".to_string(),
                "replace neigh 10.244.3.0 lladdr 02:00:00:00:00:0c dev veilvx1".to_string(),
            ]
        );
        assert_eq!(k.index_of("veilvx1"), Some(vx));
        assert!(report.recreated_links.is_empty());
    }

    #[test]
    fn mac_change_rewrites_neighbours_the_kernel_will_flush() {
        let mut k = kernel();
        let desired = two_peers();
        run(apply(&mut k, &desired)).unwrap();
        let vx = k.index_of("veilvx1").unwrap();
        k.tamper_link(vx, |l| l.mac = Some("02:99:99:99:99:99".parse().unwrap()));
        let report = run(apply(&mut k, &desired)).unwrap();
        let neighs = report
            .ops
            .iter()
            .filter(|o| matches!(o, Op::ReplaceNeigh(_)))
            .count();
        assert_eq!(neighs, 2, "{:?}", report.ops);
        assert!(matches!(report.ops[0], Op::SetLink { mac: Some(_), .. }));
    }

    #[test]
    fn incompatible_vxlan_is_replaced_and_reprogrammed() {
        let mut k = kernel();
        let desired = two_peers();
        run(apply(&mut k, &desired)).unwrap();
        let old = k.index_of("veilvx1").unwrap();
        k.tamper_link(old, |l| {
            if let Some(v) = l.vxlan.as_mut() {
                v.vni = Some(7);
            }
        });
        let report = run(apply(&mut k, &desired)).unwrap();
        assert_eq!(report.recreated_links, vec!["veilvx1".to_string()]);
        let text: Vec<String> = report.ops.iter().map(ToString::to_string).collect();
        assert!(
            text[0].starts_with("delete link veilvx1 (vni Some(7) → 1"),
            "{text:?}"
        );
        assert_eq!(text[1], "create link veilvx1");
        // Everything on the new device is written again; the kernel dropped it with the old one.
        assert_eq!(text.iter().filter(|t| t.contains("route")).count(), 2);
        assert_eq!(text.iter().filter(|t| t.contains("fdb")).count(), 2);
        assert_eq!(text.iter().filter(|t| t.contains("neigh")).count(), 2);
        assert!(text
            .iter()
            .any(|t| t == "add address 10.244.1.0/32 dev veilvx1"));
        assert_ne!(k.index_of("veilvx1"), Some(old));
        assert!(run(apply(&mut k, &desired)).unwrap().ops.is_empty());
    }

    #[test]
    fn changed_underlay_device_forces_replacement() {
        let mut k = kernel();
        k.add_device("eth1", 1500);
        let desired = two_peers();
        run(apply(&mut k, &desired)).unwrap();
        let mut moved = desired.clone();
        moved.vxlan.underlay_dev = "eth1".into();
        let report = run(apply(&mut k, &moved)).unwrap();
        assert_eq!(report.recreated_links, vec!["veilvx1".to_string()]);
    }

    #[test]
    fn wrong_kind_holding_our_name_is_replaced() {
        let mut k = kernel();
        k.add_device("veilbr0", 1500);
        let report = run(apply(&mut k, &two_peers())).unwrap();
        assert_eq!(report.recreated_links, vec!["veilbr0".to_string()]);
        assert!(matches!(report.ops[0], Op::DeleteLink { .. }));
    }

    #[test]
    fn missing_underlay_is_an_error_and_writes_nothing() {
        let mut k = FakeKernel::new();
        let err = run(apply(&mut k, &two_peers())).unwrap_err();
        assert!(matches!(err, ApplyError::MissingUnderlay { .. }), "{err}");
        assert!(k.writes().is_empty());
    }

    #[test]
    fn deleting_what_is_already_gone_is_success() {
        let mut k = kernel();
        run(apply(&mut k, &two_peers())).unwrap();
        // Something else removed the route between our dump and our delete.
        k.inject_errno("del_route", libc::ESRCH);
        k.inject_errno("del_neigh", libc::ENOENT);
        let report = run(apply(&mut k, &desired_with(vec![]))).unwrap();
        assert_eq!(report.writes(), 6);
        // The fake left those two in place (it only returned the errno): the next run converges.
        let report = run(apply(&mut k, &desired_with(vec![]))).unwrap();
        assert_eq!(report.writes(), 2, "{:?}", report.ops);
        assert!(run(apply(&mut k, &desired_with(vec![])))
            .unwrap()
            .ops
            .is_empty());
    }

    #[test]
    fn entry_failures_are_collected_not_fatal() {
        let mut k = kernel();
        k.inject_errno("replace_route", libc::ENETUNREACH);
        let err = run(apply(&mut k, &two_peers())).unwrap_err();
        match err {
            ApplyError::Incomplete { applied, failed } => {
                assert_eq!(failed.len(), 1);
                assert_eq!(applied, 9);
                assert!(matches!(failed[0].op, Op::ReplaceRoute(_)));
            }
            other => panic!("{other}"),
        }
        // The next run repairs just the missing route.
        let report = run(apply(&mut k, &two_peers())).unwrap();
        assert_eq!(report.writes(), 1);
    }

    #[test]
    fn link_failures_stop_the_run() {
        let mut k = kernel();
        k.inject_errno("create_link", libc::EPERM);
        let err = run(apply(&mut k, &two_peers())).unwrap_err();
        assert!(matches!(err, ApplyError::Link { .. }), "{err}");
        assert!(k.index_of("veilvx1").is_none());
    }

    #[test]
    fn route_moving_to_another_managed_device_is_one_replace() {
        let desired = two_peers();
        let vx = desired.vxlan.link.name.clone();
        let actual = ActualState {
            links: vec![
                link(1, "eth0", LinkKind::Device, &desired),
                link(2, "veilbr0", LinkKind::Bridge, &desired),
                link(3, &vx, LinkKind::Vxlan, &desired),
            ],
            ..Default::default()
        };
        let mut actual = actual;
        // Pretend 10.244.2.0/24 currently goes via the bridge (stand-in for another transport).
        actual.routes.push(ObservedRoute {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: None,
            oif: Some(2),
            onlink: false,
            protocol: VEILNET_ROUTE_PROTOCOL,
            src: None,
            table: MAIN_TABLE,
        });
        let ops = plan(&actual, &desired);
        let route_ops: Vec<&Op> = ops
            .iter()
            .filter(|o| matches!(o, Op::DelRoute(_) | Op::ReplaceRoute(_)))
            .collect();
        assert_eq!(route_ops.len(), 2, "{ops:?}");
        assert!(route_ops.iter().all(|o| matches!(o, Op::ReplaceRoute(_))));
    }

    fn link(index: u32, name: &str, kind: LinkKind, d: &DesiredOverlay) -> ObservedLink {
        let (mac, vxlan) = match kind {
            LinkKind::Vxlan => (
                Some(d.vxlan.link.mac),
                Some(VxlanAttrs {
                    vni: Some(d.vxlan.vni),
                    port: Some(d.vxlan.port),
                    local: Some(d.vxlan.local),
                    underlay_index: Some(1),
                    learning: Some(false),
                }),
            ),
            LinkKind::Bridge => (Some(d.bridge.mac), None),
            _ => (None, None),
        };
        ObservedLink {
            index,
            name: name.into(),
            bridge: (kind == LinkKind::Bridge).then_some(POD_BRIDGE_OPTIONS),
            kind,
            mtu: d.pod_mtu,
            mac,
            up: true,
            vxlan,
        }
    }

    #[test]
    fn bridge_options_are_set_in_place_and_only_when_they_differ() {
        let desired = two_peers();
        let bridge = |opts: Option<BridgeAttrs>| {
            let mut b = link(2, &desired.bridge.name, LinkKind::Bridge, &desired);
            b.bridge = opts;
            b
        };
        let want = DesiredLink::Bridge(desired.bridge.clone());
        assert_eq!(incompatibility(&bridge(None), &want, Some(1)), None);
        // An old agent's bridge: link-local learning on, the default cap (0: none).
        let old = bridge(Some(BridgeAttrs {
            no_linklocal_learn: Some(false),
            fdb_max_learned: Some(0),
        }));
        assert_eq!(bridge_options_change(&old), Some(POD_BRIDGE_OPTIONS));
        assert_eq!(
            bridge_options_change(&bridge(Some(POD_BRIDGE_OPTIONS))),
            None
        );
        // A kernel without fdb_max_learned (< 6.8) reports none: only the boolopt is written.
        let pre_68 = bridge(Some(BridgeAttrs {
            no_linklocal_learn: Some(false),
            fdb_max_learned: None,
        }));
        assert_eq!(
            bridge_options_change(&pre_68),
            Some(BridgeAttrs {
                no_linklocal_learn: Some(true),
                fdb_max_learned: None,
            })
        );
        assert_eq!(
            bridge_options_change(&bridge(Some(BridgeAttrs {
                no_linklocal_learn: Some(true),
                fdb_max_learned: None,
            }))),
            None
        );
    }

    #[test]
    fn an_old_bridge_gets_its_options_without_a_recreate_and_then_nothing() {
        let desired = two_peers();
        let mut k = kernel();
        run(apply(&mut k, &desired)).unwrap();
        let index = k.index_of(&desired.bridge.name).unwrap();
        run(k.set_link(
            index,
            &LinkChange {
                bridge: Some(BridgeAttrs {
                    no_linklocal_learn: Some(false),
                    fdb_max_learned: Some(0),
                }),
                ..LinkChange::default()
            },
        ))
        .unwrap();
        let report = run(apply(&mut k, &desired)).unwrap();
        assert_eq!(
            report.ops,
            vec![Op::SetLink {
                name: desired.bridge.name.clone(),
                mtu: None,
                mac: None,
                up: false,
                bridge: Some(POD_BRIDGE_OPTIONS),
            }]
        );
        assert!(report.recreated_links.is_empty());
        assert_eq!(k.index_of(&desired.bridge.name), Some(index));
        assert_eq!(run(apply(&mut k, &desired)).unwrap().writes(), 0);
    }

    #[test]
    fn learning_attribute_absent_counts_as_off() {
        let desired = two_peers();
        let mut vx = link(3, "veilvx1", LinkKind::Vxlan, &desired);
        vx.vxlan.as_mut().unwrap().learning = None;
        assert_eq!(
            incompatibility(&vx, &DesiredLink::Vxlan(desired.vxlan.clone()), Some(1)),
            None
        );
        vx.vxlan.as_mut().unwrap().learning = Some(true);
        assert!(
            incompatibility(&vx, &DesiredLink::Vxlan(desired.vxlan.clone()), Some(1))
                .unwrap()
                .contains("learning")
        );
    }

    #[test]
    fn fdb_mac_with_extra_destinations_is_cleaned() {
        let desired = two_peers();
        let mut actual = ActualState {
            links: vec![
                link(1, "eth0", LinkKind::Device, &desired),
                link(2, "veilbr0", LinkKind::Bridge, &desired),
                link(3, "veilvx1", LinkKind::Vxlan, &desired),
            ],
            ..Default::default()
        };
        actual.addresses = vec![
            ObservedAddress {
                index: 2,
                addr: "10.244.1.1/24".parse().unwrap(),
            },
            ObservedAddress {
                index: 3,
                addr: "10.244.1.0/32".parse().unwrap(),
            },
        ];
        for e in &desired.fdb {
            actual.fdb.push(ObservedFdb {
                index: 3,
                mac: e.mac,
                dst: Some(e.dst),
                permanent: true,
            });
        }
        let stray = desired.fdb.iter().next().unwrap().mac;
        actual.fdb.push(ObservedFdb {
            index: 3,
            mac: stray,
            dst: Some("192.168.50.99".parse().unwrap()),
            permanent: true,
        });
        let ops = plan(&actual, &desired);
        let fdb_ops: Vec<&Op> = ops
            .iter()
            .filter(|o| matches!(o, Op::DelFdb(_) | Op::ReplaceFdb(_)))
            .collect();
        assert_eq!(fdb_ops.len(), 1, "{ops:?}");
        assert!(matches!(fdb_ops[0], Op::DelFdb(e) if e.dst.to_string() == "192.168.50.99"));
    }
}
