//! veilnet: encrypted, isolated pod networking for Kubernetes.
//!
//! Split by concern:
//! - `model`: pure planners (annotations, overlay plan, MTU) — no I/O, unit-tested without root.
//! - `kernel`: appliers over netlink that diff the kernel against a plan and apply the difference.
//! - `policy`: the NetworkPolicy compiler (pure) and its nftables enforcer.
//! - `wg`: the userspace WireGuard datapath (boringtun over TUN).
//! - `cluster`: the Kubernetes side (pod CIDR ownership, publishing this node's annotations).
//! - `agent`: the per-node daemon wiring it together.
//! - `doctor`: `veilnet doctor`, the node's preflight and health checks.
//! - `install`: what the install manifest must grant (the agent's API calls).
//! - `netns`: namespace helpers; `logging`: the tracing setup shared by every daemon;
//!   `duration`: duration flags; `lab_paths`: where a lab keeps the files `veilnet status --lab`
//!   and `veilnet policy explain --lab` read.
//!
//! The lab itself (API stand-in, lab kubelet, topology, benchmarks, test scenarios) is the
//! `veilnet-lab` crate under `tests/lab/`: it uses this crate; this crate never uses it. The
//! `veilnet lab …` and `veilnet bench …` commands hand off to its `veilnet-lab` binary.

pub mod agent;
pub mod audit;
pub mod cluster;
pub mod datapath;
pub mod dns;
pub mod doctor;
pub mod duration;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod install;
pub mod kernel;
pub mod kubectl_plugin;
pub mod lab_paths;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod model;
pub mod netfilter;
pub mod netns;
pub mod observe;
pub mod policy;
pub mod status_cmd;
pub mod stdout;
pub mod wg;
