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

pub mod applied;
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

/// The clients against a real kernel, in a network namespace of their own (root only).
#[cfg(test)]
mod kernel_tests {
    use std::time::Duration;

    use super::conntrack::ConntrackSocket;
    use super::counters::{read_counters_of, CounterValue};
    use super::nflog::NflogSocket;
    use super::nft::{run_here, Flags};

    const TABLE: &str = "vn_nf_test";
    const GROUP: u16 = 4242;

    /// Runs `f` on a fresh thread moved into a new, empty network namespace (the namespace goes
    /// away with the thread).
    fn in_new_netns(f: impl FnOnce() + Send + 'static) {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (a network namespace of its own)");
            return;
        }
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            f()
        })
        .join()
        .expect("the test thread panicked");
    }

    #[test]
    fn counters_nflog_and_conntrack_speak_to_the_kernel() {
        in_new_netns(|| {
            let lo = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(lo.success());
            let script = format!(
                "table inet {TABLE} {{\n\
                 counter seen {{ packets 3 bytes 120 }}\n\
                 chain out {{ type filter hook output priority 0; \
                 ct state new udp dport 9 counter name seen log group {GROUP} prefix \"vn-test\"; }}\n\
                 }}\n"
            );
            run_here(&script, Flags::default(), "test").expect("the table loads");

            // Counters: the one named counter of the table, as loaded.
            let before = read_counters_of(TABLE).expect("counter dump");
            assert_eq!(
                before,
                vec![CounterValue {
                    family: "inet".into(),
                    name: "seen".into(),
                    packets: 3,
                    bytes: 120
                }]
            );
            assert_eq!(
                read_counters_of("no_such_table").unwrap_or_default(),
                vec![]
            );

            // NFLOG: subscribed (the kernel acknowledged both requests), then one logged packet.
            let mut log = NflogSocket::open(GROUP, Duration::from_millis(200)).expect("NFLOG");
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            udp.send_to(b"hello", "127.0.0.1:9").unwrap();
            let mut logged = Vec::new();
            for _ in 0..10 {
                logged.extend(log.recv().expect("NFLOG recv"));
                if !logged.is_empty() {
                    break;
                }
            }
            assert_eq!(logged.len(), 1, "{logged:?}");
            assert_eq!(logged[0].prefix, "vn-test");
            assert_eq!(logged[0].payload.first().map(|b| b >> 4), Some(4));
            let after = read_counters_of(TABLE).expect("counter dump");
            assert_eq!(after[0].packets, 4);

            // Conntrack: the datagram's entry is dumped, deleted, and then gone.
            let mut ct = ConntrackSocket::open(Duration::from_secs(2)).expect("ctnetlink");
            let port = udp.local_addr().unwrap().port();
            let entry = ct
                .dump()
                .expect("conntrack dump")
                .into_iter()
                .find(|e| e.orig.proto == 17 && e.orig.src_port == port && e.orig.dst_port == 9)
                .expect("the datagram's conntrack entry");
            assert!(ct.delete(&entry).expect("delete"));
            assert!(!ct.delete(&entry).expect("second delete"), "already gone");
            assert!(ct
                .dump()
                .expect("conntrack dump")
                .iter()
                .all(|e| e.orig != entry.orig));
        });
    }
}
