//! veilnet's CNI plugin as a library: the CNI protocol types, the node state file shared with
//! the agent, host-local IPAM, a small synchronous rtnetlink client, and the commands.
//!
//! The binary (`veilnet-cni`) is a thin wrapper around [`run`]. The agent depends on this crate
//! for [`NodeState`] (what it writes to `<runDir>/node-state.json`).

#![forbid(unsafe_code)]

pub mod agent_protocol;
pub mod capabilities;
pub mod config;
pub mod env;
pub mod fsutil;
pub mod hostport;
pub mod ipam;
pub mod netlink;
pub mod node_state;
pub mod plugin;
pub mod sandbox;
pub mod spec;
pub mod tc;

pub use node_state::{NodeState, NodeStateError, NODE_STATE_FILE, NODE_STATE_VERSION};
pub use plugin::{host_veth_name, run, Outcome, PluginError, HOST_VETH_PREFIX};
