//! The per-node agent (`veilnet agent`): watches the cluster, plans the node's dataplane and applies
//! it. (The reconcile loop is being wired; see issue 3.)
//!
//! - `config`: flags, environment and config file, resolved and validated once.
//! - `watch`: reflectors feeding the planners.
//! - `events`: Kubernetes Events for what the agent refuses.

pub mod config;
pub mod events;
pub mod watch;
