//! Everything veilnet says to netfilter, in one room: the one nftables runner both the wire
//! firewall (`kernel::wire`) and the policy enforcer (`policy::apply`) hand their scripts to, and
//! the `NETLINK_NETFILTER` clients that read back what the rules do.
//!
//! - [`nft`]: runs nft scripts (in-process libnftables, the `nft` binary as fallback).
//! - [`socket`]: the nfnetlink socket ([`netlink_sys::Socket`]) and framing
//!   ([`netlink_packet_core`]'s message and attribute buffers, with the `nfgenmsg` header).
//! - [`counters`]: named nf_tables counters, one `NFT_MSG_GETOBJ` dump.
//! - [`nflog`]: the packets a ruleset logs (`log group N`), subscribed over `NFNL_SUBSYS_ULOG`.
//! - [`conntrack`]: dump and delete of conntrack entries over ctnetlink.
//!
//! The crates in the tree give the socket and the generic netlink framing (header, attributes,
//! error and done messages) but no nfnetlink message types: `netlink-packet-netfilter`, the
//! rust-netlink crate with NFLOG types, is not in the tree, and no crate of that family models
//! nf_tables objects or ctnetlink. So the three message bodies (the `nfgenmsg` header and which
//! attribute means what) are written here, on top of `netlink-packet-core`; each parser is pure
//! and never panics on malformed input (a truncated message or attribute ends the walk).
//!
//! This module knows nothing about policies or wire rules: callers name the table, the NFLOG
//! group, and judge conntrack entries themselves.

pub mod conntrack;
pub mod counters;
pub mod nflog;
pub mod nft;
pub mod socket;

pub use counters::CounterValue;
pub use nft::Flags;

use crate::netns::NetnsError;

/// Failures of talking to netfilter (nft scripts and nfnetlink sockets).
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    /// nftables refused the script (its parser or the kernel), with what it said.
    #[error("nft {action} failed: {message}")]
    NftRefused { action: String, message: String },
    #[error("failed to run nft ({action}): {source}")]
    NftIo {
        action: String,
        source: std::io::Error,
    },
    #[error("nft {action}: the script contains a NUL byte")]
    NftNul { action: String },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A syscall on the nfnetlink socket failed (`op`: socket, bind, send, recv, a socket option).
    #[error("netfilter socket ({op}): {source}")]
    Socket {
        op: &'static str,
        source: std::io::Error,
    },
    /// The kernel answered a request with an error (`op`: the request).
    #[error("netfilter {op}: {source}")]
    Refused {
        op: &'static str,
        source: std::io::Error,
    },
    /// A conntrack dump longer than this was given up (a table growing under the walk).
    #[error("ctnetlink dump: more than {0} entries")]
    TooMany(usize),
}

pub type Result<T> = std::result::Result<T, NetfilterError>;
