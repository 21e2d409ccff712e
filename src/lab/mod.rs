//! The lab: a whole multi-node cluster in network namespaces on one machine.
//!
//! - `layout`: names, addresses and paths of one lab (pure).
//! - `topology`: creates and removes the lab's namespaces, underlay bridge and veths.
//! - `daemon`: the lab's long-running processes (pid and log files).
//! - `client`: talking to a lab's API from the root namespace.
//! - `apiserver`: the Kubernetes API stand-in served on the control plane's underlay address.
//! - `kubelet`: the per-node pod runner that drives CNI plugins as a container runtime does.
//! - `agnhost`: the built-in test workload (serve / connect).
//! - `cli`: the `veilnet lab …` commands that tie these together.

pub mod agnhost;
pub mod apiserver;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod kubelet;
pub mod layout;
pub mod topology;
