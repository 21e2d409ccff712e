//! veilnet: encrypted, isolated pod networking for Kubernetes.
//!
//! The crate is split by concern: `lab` is the netns test bed (API stand-in, kubelet, topology),
//! `netns` the shared namespace helpers, `logging` the tracing setup shared by every daemon.

pub mod cluster;
pub mod lab;
pub mod logging;
pub mod netns;
pub mod policy;
