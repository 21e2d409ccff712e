//! Programming the node's kernel: the overlay applier over rtnetlink, MTU discovery, sysctls.
//!
//! Netlink sits behind [`OverlayKernel`], a small domain-level trait (dump links, replace a route,
//! ...), with one implementation over `rtnetlink` ([`NetlinkKernel`]) and one in memory
//! (`fake::FakeKernel`, compiled only for this crate's unit tests) for tests without root.
//! [`apply`] reads the actual state, diffs it against the planner's
//! [`DesiredOverlay`](crate::model::overlay::DesiredOverlay) with the pure [`plan`], and writes
//! only the difference.
//!
//! One netlink connection belongs to one network namespace for its whole life: open it on a
//! thread that is inside the namespace ([`NetlinkKernel::connect_in`]) or from a process that
//! already lives there ([`NetlinkKernel::connect`]). Never `setns` a tokio worker.

use std::future::Future;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::MacAddr;
use crate::netns::NetnsError;

pub mod apply;
#[cfg(test)]
pub mod fake;
pub mod masquerade;
pub mod mtu;
pub mod netlink;
pub mod sysctl;
pub mod wire;

pub use apply::{apply, plan, ActualState, ApplyError, ApplyReport, DesiredLink, Op};
#[cfg(test)]
pub use fake::FakeKernel;
pub use netlink::NetlinkKernel;

/// `rtm_protocol` of every route veilnet installs. Routes are recognised as ours by this value
/// (plus living on a veilnet device), so routes the kernel adds for addresses, or that an admin
/// adds by hand on our devices, are never touched. 86 is ASCII 'V'; it is not assigned in
/// iproute2's `rt_protos`.
pub const VEILNET_ROUTE_PROTOCOL: u8 = 86;

pub use crate::model::overlay::{MAIN_TABLE, POD_TO_NODE_TABLE};

/// The errno classes the applier reacts to. Everything else is a plain failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrnoClass {
    /// EEXIST: the object is already there.
    Exists,
    /// ENOENT, ESRCH (route deletion), EADDRNOTAVAIL (address deletion): the object is not there.
    NotFound,
    /// ENODEV: the device the object hangs off is gone.
    NoDevice,
    Other,
}

impl ErrnoClass {
    /// True if a deletion that failed this way has nonetheless reached its goal.
    pub fn means_gone(self) -> bool {
        matches!(self, ErrnoClass::NotFound | ErrnoClass::NoDevice)
    }
}

/// The one place errno values are interpreted.
pub fn classify(errno: i32) -> ErrnoClass {
    match errno {
        libc::EEXIST => ErrnoClass::Exists,
        libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL => ErrnoClass::NotFound,
        libc::ENODEV => ErrnoClass::NoDevice,
        _ => ErrnoClass::Other,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op} {target}: {} (errno {errno})", std::io::Error::from_raw_os_error(*errno))]
    Errno {
        op: &'static str,
        target: String,
        errno: i32,
    },
    #[error("{op} {target}: {source}")]
    Netlink {
        op: &'static str,
        target: String,
        // Boxed: the error can carry a whole netlink message.
        source: Box<rtnetlink::Error>,
    },
    #[error("opening a netlink socket: {source}")]
    Connect { source: std::io::Error },
    #[error("no tokio runtime to drive the netlink connection")]
    NoRuntime,
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
    #[error("invalid sysctl key {key:?}")]
    BadSysctlKey { key: String },
    #[error("no route to {dst}")]
    NoRoute { dst: IpAddr },
    #[error("route to {dst} has no output device")]
    NoOutputDevice { dst: IpAddr },
    #[error("no link with index {index}")]
    NoSuchLink { index: u32 },
}

impl KernelError {
    /// The errno class, for errors the kernel answered with an errno.
    pub fn class(&self) -> Option<ErrnoClass> {
        match self {
            KernelError::Errno { errno, .. } => Some(classify(*errno)),
            _ => None,
        }
    }
}

/// What a link is, as far as the applier cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Vxlan,
    /// Any other `IFLA_INFO_KIND` (veth, dummy, ...).
    Other(String),
    /// No kind reported: a physical device or loopback.
    Device,
}

/// The creation-time attributes of a VXLAN link (what forces a re-create when they differ).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VxlanAttrs {
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub underlay_index: Option<u32>,
    pub learning: Option<bool>,
}

/// The bridge options veilnet sets on its pod bridge (`None`: not reported / leave alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BridgeAttrs {
    /// The `no_linklocal_learn` boolopt: frames to `01:80:c2:00:00:0X` never teach the FDB.
    pub no_linklocal_learn: Option<bool>,
    /// `fdb_max_learned` (kernel 6.8+): the most learned (dynamic) FDB entries the bridge keeps.
    pub fdb_max_learned: Option<u32>,
}

/// The pod bridge's options. Pod ports do not learn at all (the CNI plugin gives each pod's MAC a
/// static entry on its port), so the bridge learns nothing in normal operation; the cap bounds the
/// FDB's kernel memory should a port ever learn (a port from before the upgrade, an admin's port).
pub const POD_BRIDGE_OPTIONS: BridgeAttrs = BridgeAttrs {
    no_linklocal_learn: Some(true),
    fdb_max_learned: Some(POD_BRIDGE_FDB_MAX_LEARNED),
};

/// The learned-entry cap of the pod bridge (~125 bytes of slab per entry).
pub const POD_BRIDGE_FDB_MAX_LEARNED: u32 = veilnet_cni::netlink::BRIDGE_FDB_MAX_LEARNED;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedLink {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    pub up: bool,
    pub vxlan: Option<VxlanAttrs>,
    /// Bridge options, for bridges.
    pub bridge: Option<BridgeAttrs>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObservedAddress {
    pub index: u32,
    pub addr: IpNet,
}

/// A unicast route of the main table or veilnet's [`POD_TO_NODE_TABLE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRoute {
    pub dst: IpNet,
    pub via: Option<IpAddr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    pub protocol: u8,
    pub src: Option<IpAddr>,
    pub table: u32,
}

/// A policy routing rule (either family). Only rules with [`VEILNET_ROUTE_PROTOCOL`] are ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRule {
    pub priority: u32,
    pub src: Option<IpNet>,
    pub table: u32,
    pub protocol: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNeigh {
    pub index: u32,
    pub ip: IpAddr,
    pub mac: Option<MacAddr>,
    pub permanent: bool,
}

/// A VXLAN forwarding entry (`bridge fdb ... self`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedFdb {
    pub index: u32,
    pub mac: MacAddr,
    pub dst: Option<IpAddr>,
    pub permanent: bool,
}

/// How to create a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewLinkKind {
    Bridge,
    Vxlan {
        vni: u32,
        port: u16,
        local: IpAddr,
        underlay_index: u32,
        learning: bool,
    },
}

/// A link to create, administratively up. A bridge gets [`POD_BRIDGE_OPTIONS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLink {
    pub name: String,
    pub mtu: u32,
    pub mac: MacAddr,
    pub kind: NewLinkKind,
}

/// In-place link changes; `None` leaves a setting alone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkChange {
    pub mtu: Option<u32>,
    pub mac: Option<MacAddr>,
    pub up: bool,
    /// Bridge options to set (the `Some` fields of it).
    pub bridge: Option<BridgeAttrs>,
}

/// A route to write: always [`VEILNET_ROUTE_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: IpNet,
    pub via: Option<IpAddr>,
    pub oif: u32,
    pub onlink: bool,
    pub src: Option<IpAddr>,
    pub table: u32,
}

/// The kernel verbs the overlay needs. Writes are idempotent where the kernel allows it
/// (`NLM_F_REPLACE`); deletions of absent objects fail with an errno the caller classifies.
pub trait OverlayKernel {
    fn dump_links(&mut self)
        -> impl Future<Output = Result<Vec<ObservedLink>, KernelError>> + Send;
    fn dump_addresses(
        &mut self,
    ) -> impl Future<Output = Result<Vec<ObservedAddress>, KernelError>> + Send;
    /// Unicast routes of the main table and of [`POD_TO_NODE_TABLE`], both families.
    fn dump_routes(
        &mut self,
    ) -> impl Future<Output = Result<Vec<ObservedRoute>, KernelError>> + Send;
    /// Policy routing rules, both families.
    fn dump_rules(&mut self)
        -> impl Future<Output = Result<Vec<ObservedRule>, KernelError>> + Send;
    /// Adds a rule with [`VEILNET_ROUTE_PROTOCOL`] (EEXIST if it is there).
    fn add_rule(
        &mut self,
        rule: &crate::model::overlay::RuleSpec,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn del_rule(
        &mut self,
        rule: &crate::model::overlay::RuleSpec,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    /// IPv4 and IPv6 neighbours on one device.
    fn dump_neighbours(
        &mut self,
        index: u32,
    ) -> impl Future<Output = Result<Vec<ObservedNeigh>, KernelError>> + Send;
    /// The device's own FDB entries (not a bridge master's).
    fn dump_fdb(
        &mut self,
        index: u32,
    ) -> impl Future<Output = Result<Vec<ObservedFdb>, KernelError>> + Send;

    fn create_link(
        &mut self,
        link: &NewLink,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn set_link(
        &mut self,
        index: u32,
        change: &LinkChange,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn delete_link(&mut self, index: u32) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn add_address(
        &mut self,
        index: u32,
        addr: IpNet,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn del_address(
        &mut self,
        index: u32,
        addr: IpNet,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn replace_route(
        &mut self,
        route: &KernelRoute,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn del_route(
        &mut self,
        route: &KernelRoute,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn replace_neigh(
        &mut self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn del_neigh(
        &mut self,
        index: u32,
        ip: IpAddr,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn replace_fdb(
        &mut self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn del_fdb(
        &mut self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_classes() {
        assert_eq!(classify(libc::EEXIST), ErrnoClass::Exists);
        assert_eq!(classify(libc::ENOENT), ErrnoClass::NotFound);
        assert_eq!(classify(libc::ESRCH), ErrnoClass::NotFound);
        assert_eq!(classify(libc::EADDRNOTAVAIL), ErrnoClass::NotFound);
        assert_eq!(classify(libc::ENODEV), ErrnoClass::NoDevice);
        assert_eq!(classify(libc::EPERM), ErrnoClass::Other);
        assert!(ErrnoClass::NotFound.means_gone());
        assert!(ErrnoClass::NoDevice.means_gone());
        assert!(!ErrnoClass::Exists.means_gone());
        let e = KernelError::Errno {
            op: "del_route",
            target: "10.0.0.0/24".into(),
            errno: libc::ESRCH,
        };
        assert_eq!(e.class(), Some(ErrnoClass::NotFound));
        assert!(e.to_string().contains("10.0.0.0/24"), "{e}");
        assert_eq!(KernelError::NoRuntime.class(), None);
    }
}
