//! veilnet-lab: the test bed and the test-only data of veilnet, kept out of the shipped crate.
//!
//! The lab runs a whole multi-node cluster in network namespaces on one machine, driving the
//! product only through its public faces: the `veilnet` binary (agent, datapath), the
//! `veilnet-cni` plugin, and the `veilnet` library's API.
//!
//! - `layout`: names, addresses and paths of one lab (pure), on the product's
//!   [`veilnet::lab_paths`] convention.
//! - `topology`: creates and removes the lab's namespaces, underlay bridge and veths.
//! - `daemon`: the lab's long-running processes (pid and log files).
//! - `client`: talking to a lab's API from the root namespace.
//! - `apiserver`: the Kubernetes API stand-in served on the control plane's underlay address.
//! - `control_plane`: the real Kubernetes control plane (`lab up --control-plane kubernetes`).
//! - `kubelet`: the per-node pod runner that drives CNI plugins as a container runtime does.
//! - `agnhost`: the built-in test workload (serve / connect).
//! - `cli`: the `veilnet-lab …` commands (also reached as `veilnet lab …`).
//! - `bench`: the benchmark commands of `scripts/bench*.sh` (`veilnet bench …`).
//! - `scenarios`: the upstream NetworkPolicy e2e scenarios, checked against `explain` here and
//!   probed in a lab by `tests/lab_netpol.rs`.
//! - `rbac`: an RBAC evaluator with Kubernetes' matching rules (`tests/rbac.rs`).

pub mod agnhost;
pub mod apiserver;
pub mod bench;
pub mod cli;
pub mod client;
pub mod control_plane;
pub mod daemon;
pub mod kubelet;
pub mod layout;
pub mod rbac;
pub mod scenarios;
pub mod topology;
