//! The Kubernetes side of the agent: where cluster state comes from and what the agent writes back.
//!
//! - `podcidr`: pod CIDR ownership: the Node's `spec.podCIDR(s)`, or veilnet's shared allocation
//!   record (one ConfigMap updated with optimistic concurrency).
//! - `publish`: this node's annotations, written through `nodes/status`.

pub mod podcidr;
pub mod publish;
