//! An in-memory [`OverlayKernel`] for tests without root.
//!
//! It keeps the same tables the kernel would and mimics the kernel behaviour the applier relies
//! on: errnos for duplicates and missing objects, removal of everything hanging off a deleted
//! link, the kernel's own prefix route for each IPv4 address, fresh ifindexes on creation. Every
//! write is logged so tests can count them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    BridgeAttrs, KernelError, KernelRoute, LinkChange, LinkKind, NewLink, NewLinkKind,
    ObservedAddress, ObservedFdb, ObservedLink, ObservedNeigh, ObservedRoute, ObservedRule,
    OverlayKernel, VxlanAttrs, MAIN_TABLE, POD_BRIDGE_OPTIONS, VEILNET_ROUTE_PROTOCOL,
};
use crate::model::overlay::RuleSpec;
use crate::model::MacAddr;

/// `RTPROT_KERNEL`: the protocol of the routes the kernel adds for addresses.
const KERNEL_PROTOCOL: u8 = 2;

/// Every table of the fake, comparable as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeState {
    pub links: BTreeMap<u32, ObservedLink>,
    pub addresses: Vec<ObservedAddress>,
    pub routes: Vec<ObservedRoute>,
    pub rules: Vec<ObservedRule>,
    pub neighbours: Vec<ObservedNeigh>,
    pub fdb: Vec<ObservedFdb>,
}

#[derive(Debug, Default)]
pub struct FakeKernel {
    state: FakeState,
    next_index: u32,
    writes: Vec<String>,
    /// One-shot errnos by verb name (`"del_route"`, ...).
    injected: BTreeMap<&'static str, i32>,
}

fn errno(op: &'static str, target: impl ToString, errno: i32) -> KernelError {
    KernelError::Errno {
        op,
        target: target.to_string(),
        errno,
    }
}

impl FakeKernel {
    pub fn new() -> Self {
        FakeKernel {
            next_index: 1,
            ..Default::default()
        }
    }

    /// Adds a plain device (like a NIC), up, and returns its ifindex.
    pub fn add_device(&mut self, name: &str, mtu: u32) -> u32 {
        self.insert_link(name, LinkKind::Device, mtu, None, None)
    }

    fn insert_link(
        &mut self,
        name: &str,
        kind: LinkKind,
        mtu: u32,
        mac: Option<MacAddr>,
        vxlan: Option<VxlanAttrs>,
    ) -> u32 {
        let index = self.next_index;
        self.next_index += 1;
        self.state.links.insert(
            index,
            ObservedLink {
                index,
                name: name.to_string(),
                mtu,
                mac,
                up: true,
                bridge: (kind == LinkKind::Bridge).then_some(POD_BRIDGE_OPTIONS),
                kind,
                vxlan,
            },
        );
        index
    }

    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.state
            .links
            .values()
            .find(|l| l.name == name)
            .map(|l| l.index)
    }

    pub fn state(&self) -> FakeState {
        self.state.clone()
    }

    /// The log of writes, one line per call, in order.
    pub fn writes(&self) -> &[String] {
        &self.writes
    }

    /// Makes the next call of `op` fail with `errno` (without touching any table).
    pub fn inject_errno(&mut self, op: &'static str, errno: i32) {
        self.injected.insert(op, errno);
    }

    /// Changes a link behind the applier's back.
    pub fn tamper_link(&mut self, index: u32, f: impl FnOnce(&mut ObservedLink)) {
        if let Some(link) = self.state.links.get_mut(&index) {
            f(link);
        }
    }

    pub fn insert_route(&mut self, route: ObservedRoute) {
        self.state.routes.push(route);
    }

    pub fn insert_rule(&mut self, rule: ObservedRule) {
        self.state.rules.push(rule);
    }

    pub fn insert_neigh(&mut self, neigh: ObservedNeigh) {
        self.state.neighbours.push(neigh);
    }

    pub fn insert_fdb(&mut self, entry: ObservedFdb) {
        self.state.fdb.push(entry);
    }

    /// Adds an address the way the kernel does, prefix route included.
    pub fn insert_address(&mut self, index: u32, addr: IpNet) {
        self.state.addresses.push(ObservedAddress { index, addr });
        let is_v4_subnet = matches!(addr, IpNet::V4(v4) if v4.prefix_len() < 32);
        if is_v4_subnet {
            self.state.routes.push(ObservedRoute {
                dst: addr.trunc(),
                via: None,
                oif: Some(index),
                onlink: false,
                protocol: KERNEL_PROTOCOL,
                src: Some(addr.addr()),
                table: MAIN_TABLE,
            });
        }
    }

    pub fn remove_address(&mut self, index: u32, addr: IpNet) {
        self.state
            .addresses
            .retain(|a| !(a.index == index && a.addr == addr));
        self.state.routes.retain(|r| {
            !(r.oif == Some(index) && r.protocol == KERNEL_PROTOCOL && r.dst == addr.trunc())
        });
    }

    /// Logs the write and fails it if an errno was injected for `op`.
    fn begin(&mut self, op: &'static str, detail: String) -> Result<(), KernelError> {
        self.writes.push(format!("{op} {detail}"));
        match self.injected.remove(op) {
            Some(e) => Err(errno(op, detail, e)),
            None => Ok(()),
        }
    }

    fn require_link(&self, op: &'static str, index: u32) -> Result<(), KernelError> {
        if self.state.links.contains_key(&index) {
            Ok(())
        } else {
            Err(errno(op, index, libc::ENODEV))
        }
    }
}

impl OverlayKernel for FakeKernel {
    async fn dump_links(&mut self) -> Result<Vec<ObservedLink>, KernelError> {
        Ok(self.state.links.values().cloned().collect())
    }

    async fn dump_addresses(&mut self) -> Result<Vec<ObservedAddress>, KernelError> {
        Ok(self.state.addresses.clone())
    }

    async fn dump_routes(&mut self) -> Result<Vec<ObservedRoute>, KernelError> {
        Ok(self.state.routes.clone())
    }

    async fn dump_rules(&mut self) -> Result<Vec<ObservedRule>, KernelError> {
        Ok(self.state.rules.clone())
    }

    async fn add_rule(&mut self, rule: &RuleSpec) -> Result<(), KernelError> {
        const OP: &str = "add_rule";
        self.begin(OP, format!("{rule:?}"))?;
        let new = ObservedRule {
            priority: rule.priority,
            src: Some(rule.src),
            table: rule.table,
            protocol: VEILNET_ROUTE_PROTOCOL,
        };
        if self.state.rules.contains(&new) {
            return Err(errno(OP, rule.src, libc::EEXIST));
        }
        self.state.rules.push(new);
        Ok(())
    }

    async fn del_rule(&mut self, rule: &RuleSpec) -> Result<(), KernelError> {
        const OP: &str = "del_rule";
        self.begin(OP, format!("{rule:?}"))?;
        let pos = self.state.rules.iter().position(|r| {
            r.priority == rule.priority && r.src == Some(rule.src) && r.table == rule.table
        });
        match pos {
            Some(i) => {
                self.state.rules.remove(i);
                Ok(())
            }
            None => Err(errno(OP, rule.src, libc::ENOENT)),
        }
    }

    async fn dump_neighbours(&mut self, index: u32) -> Result<Vec<ObservedNeigh>, KernelError> {
        Ok(self
            .state
            .neighbours
            .iter()
            .filter(|n| n.index == index)
            .cloned()
            .collect())
    }

    async fn dump_fdb(&mut self, index: u32) -> Result<Vec<ObservedFdb>, KernelError> {
        Ok(self
            .state
            .fdb
            .iter()
            .filter(|e| e.index == index)
            .cloned()
            .collect())
    }

    async fn create_link(&mut self, link: &NewLink) -> Result<(), KernelError> {
        const OP: &str = "create_link";
        self.begin(OP, link.name.clone())?;
        if self.index_of(&link.name).is_some() {
            return Err(errno(OP, &link.name, libc::EEXIST));
        }
        let (kind, vxlan) = match &link.kind {
            NewLinkKind::Bridge => (LinkKind::Bridge, None),
            NewLinkKind::Vxlan {
                vni,
                port,
                local,
                underlay_index,
                learning,
            } => {
                self.require_link(OP, *underlay_index)?;
                (
                    LinkKind::Vxlan,
                    Some(VxlanAttrs {
                        vni: Some(*vni),
                        port: Some(*port),
                        local: Some(*local),
                        underlay_index: Some(*underlay_index),
                        learning: Some(*learning),
                    }),
                )
            }
        };
        self.insert_link(&link.name, kind, link.mtu, Some(link.mac), vxlan);
        Ok(())
    }

    async fn set_link(&mut self, index: u32, change: &LinkChange) -> Result<(), KernelError> {
        const OP: &str = "set_link";
        self.begin(OP, format!("{index} {change:?}"))?;
        let link = self
            .state
            .links
            .get_mut(&index)
            .ok_or_else(|| errno(OP, index, libc::ENODEV))?;
        if let Some(mtu) = change.mtu {
            link.mtu = mtu;
        }
        if let Some(mac) = change.mac {
            link.mac = Some(mac);
        }
        if change.up {
            link.up = true;
        }
        if let Some(opts) = change.bridge {
            let have = link.bridge.get_or_insert_with(BridgeAttrs::default);
            if opts.no_linklocal_learn.is_some() {
                have.no_linklocal_learn = opts.no_linklocal_learn;
            }
            if opts.fdb_max_learned.is_some() {
                have.fdb_max_learned = opts.fdb_max_learned;
            }
        }
        Ok(())
    }

    async fn delete_link(&mut self, index: u32) -> Result<(), KernelError> {
        const OP: &str = "delete_link";
        self.begin(OP, index.to_string())?;
        self.require_link(OP, index)?;
        self.state.links.remove(&index);
        let s = &mut self.state;
        s.addresses.retain(|a| a.index != index);
        s.routes.retain(|r| r.oif != Some(index));
        s.neighbours.retain(|n| n.index != index);
        s.fdb.retain(|e| e.index != index);
        Ok(())
    }

    async fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), KernelError> {
        const OP: &str = "add_address";
        self.begin(OP, format!("{index} {addr}"))?;
        self.require_link(OP, index)?;
        if self
            .state
            .addresses
            .iter()
            .any(|a| a.index == index && a.addr == addr)
        {
            return Err(errno(OP, addr, libc::EEXIST));
        }
        self.insert_address(index, addr);
        Ok(())
    }

    async fn del_address(&mut self, index: u32, addr: IpNet) -> Result<(), KernelError> {
        const OP: &str = "del_address";
        self.begin(OP, format!("{index} {addr}"))?;
        self.require_link(OP, index)?;
        let before = self.state.addresses.len();
        self.remove_address(index, addr);
        if self.state.addresses.len() == before {
            return Err(errno(OP, addr, libc::EADDRNOTAVAIL));
        }
        Ok(())
    }

    async fn replace_route(&mut self, route: &KernelRoute) -> Result<(), KernelError> {
        const OP: &str = "replace_route";
        self.begin(OP, format!("{route:?}"))?;
        self.require_link(OP, route.oif)?;
        // One route per destination at metric 0 in each table, as in the kernel.
        let new = ObservedRoute {
            dst: route.dst,
            via: route.via,
            oif: Some(route.oif),
            onlink: route.onlink,
            protocol: VEILNET_ROUTE_PROTOCOL,
            src: route.src,
            table: route.table,
        };
        match self
            .state
            .routes
            .iter_mut()
            .find(|r| r.dst == route.dst && r.table == route.table)
        {
            Some(existing) => *existing = new,
            None => self.state.routes.push(new),
        }
        Ok(())
    }

    async fn del_route(&mut self, route: &KernelRoute) -> Result<(), KernelError> {
        const OP: &str = "del_route";
        self.begin(OP, format!("{route:?}"))?;
        let pos = self.state.routes.iter().position(|r| {
            r.dst == route.dst
                && r.table == route.table
                && r.oif == Some(route.oif)
                && r.via == route.via
                && r.protocol == VEILNET_ROUTE_PROTOCOL
        });
        match pos {
            Some(i) => {
                self.state.routes.remove(i);
                Ok(())
            }
            None => Err(errno(OP, route.dst, libc::ESRCH)),
        }
    }

    async fn replace_neigh(
        &mut self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), KernelError> {
        const OP: &str = "replace_neigh";
        self.begin(OP, format!("{index} {ip} {mac}"))?;
        self.require_link(OP, index)?;
        self.state
            .neighbours
            .retain(|n| !(n.index == index && n.ip == ip));
        self.state.neighbours.push(ObservedNeigh {
            index,
            ip,
            mac: Some(mac),
            permanent: true,
        });
        Ok(())
    }

    async fn del_neigh(&mut self, index: u32, ip: IpAddr) -> Result<(), KernelError> {
        const OP: &str = "del_neigh";
        self.begin(OP, format!("{index} {ip}"))?;
        self.require_link(OP, index)?;
        let before = self.state.neighbours.len();
        self.state
            .neighbours
            .retain(|n| !(n.index == index && n.ip == ip));
        if self.state.neighbours.len() == before {
            return Err(errno(OP, ip, libc::ENOENT));
        }
        Ok(())
    }

    async fn replace_fdb(
        &mut self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    ) -> Result<(), KernelError> {
        const OP: &str = "replace_fdb";
        self.begin(OP, format!("{index} {mac} {dst}"))?;
        self.require_link(OP, index)?;
        // Like the VXLAN driver: NLM_F_REPLACE rewrites the first destination of the MAC.
        match self
            .state
            .fdb
            .iter_mut()
            .find(|e| e.index == index && e.mac == mac)
        {
            Some(existing) => {
                existing.dst = Some(dst);
                existing.permanent = true;
            }
            None => self.state.fdb.push(ObservedFdb {
                index,
                mac,
                dst: Some(dst),
                permanent: true,
            }),
        }
        Ok(())
    }

    async fn del_fdb(&mut self, index: u32, mac: MacAddr, dst: IpAddr) -> Result<(), KernelError> {
        const OP: &str = "del_fdb";
        self.begin(OP, format!("{index} {mac} {dst}"))?;
        self.require_link(OP, index)?;
        let before = self.state.fdb.len();
        self.state
            .fdb
            .retain(|e| !(e.index == index && e.mac == mac && e.dst == Some(dst)));
        if self.state.fdb.len() == before {
            return Err(errno(OP, mac, libc::ENOENT));
        }
        Ok(())
    }
}
