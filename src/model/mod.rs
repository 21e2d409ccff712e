//! Pure, I/O-free model of what a node's overlay should look like.
//!
//! Everything here is computed from plain inputs (the node's own settings and what the cluster says
//! about its peers) and is unit-tested without root. The `kernel` module turns the result into
//! netlink writes.

pub mod annotations;
pub mod encryption;
pub mod mac;
pub mod mtu;
pub mod overlay;
pub mod peer;
pub mod routing;

pub use mac::MacAddr;
